import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAXPASSES_CHECK", "1")
