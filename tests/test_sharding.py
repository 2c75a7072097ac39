"""optimize under sharded jit, on two host CPU devices (in a subprocess: the device count is
fixed when jax starts)."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import passes
    from passes import Match, Pipeline, RulePass
    from passes.rewrite import FunctionRule

    assert jax.device_count() == 2, jax.devices()

    @jax.custom_vjp
    def kernel_exp(x):
        return jnp.exp(x)
    kernel_exp.defvjp(lambda x: (jnp.exp(x), jnp.exp(x)), lambda e, g: (g * e,))

    def m(region, pos):
        e = region.eqns[pos]
        return Match(pos, frozenset([pos]), tuple(e.invars), tuple(e.outvars), kernel_exp)

    pipe = Pipeline(passes.cleanup_passes() + [RulePass("exp", [FunctionRule("exp", [jax.lax.exp_p], m)])])

    def loss(w, x):
        return jnp.mean(jnp.exp(jnp.tanh(x @ w)))

    mesh = Mesh(np.array(jax.devices()), ("data",))
    x = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.float32),
                       NamedSharding(mesh, P("data")))
    w = jax.device_put(jnp.ones((4, 3), jnp.float32) * 0.1, NamedSharding(mesh, P()))
    opt = passes.optimize(loss, pipe)
    step = jax.jit(jax.value_and_grad(opt), in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))))
    (l, g) = step(w, x)
    (l0, g0) = jax.jit(jax.value_and_grad(loss))(w, x)
    np.testing.assert_allclose(l, l0, rtol=1e-6)
    np.testing.assert_allclose(g, g0, rtol=1e-5)
    assert "passes.exp.exp" in str(jax.make_jaxpr(step)(w, x))
    # eager call on sharded inputs: the sharding is part of the cache key
    np.testing.assert_allclose(opt(w, x), l0, rtol=1e-6)
    np.testing.assert_allclose(opt(w, np.asarray(x)), l0, rtol=1e-6)
    print("OK")
""")


def test_sharded_jit_two_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
