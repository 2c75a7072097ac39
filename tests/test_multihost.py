"""The optimized sharded train step across two processes (jax.distributed on 127.0.0.1, gloo CPU
collectives, 4 simulated devices each, one 8-device mesh) equals the single-process result."""
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 120  # both processes together, from start to exit

WORKER = textwrap.dedent("""
    import sys
    process_id, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    import jax
    # Every supported jaxlib has gloo; without it this raises and the test fails, as it should.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=60)
    try:
        import numpy as np
        import models, passes
        from jax.sharding import NamedSharding
        from experiments import sharding as sh
        assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
        assert jax.local_device_count() == 4, jax.local_devices()
        mesh = sh.make_mesh({"data": 4, "model": 2})
        spec = models.get("gpt2-tiny")
        # Every process builds the same host values; each places only its own devices' blocks.
        params = jax.tree.map(np.asarray, spec.init(jax.random.key(0)))
        data = jax.tree.map(np.asarray, spec.batch(jax.random.key(1), 8))
        ps, bs = sh.placement_shardings("data", mesh, params, data)
        put = lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
        params, data = jax.tree.map(put, params, ps), jax.tree.map(put, data, bs)
        assert not any(x.is_fully_addressable for x in jax.tree.leaves(data))  # split over both
        optimized = passes.optimize(spec.loss, passes.default_pipeline())
        step = jax.jit(jax.value_and_grad(optimized), in_shardings=(ps, bs),
                       out_shardings=(None, ps))
        jaxpr = str(jax.make_jaxpr(step)(params, data))
        loss, grads = step(params, data)
        replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
        gather = jax.jit(lambda t: t, out_shardings=replicated)
        leaves = [np.asarray(gather(g)) for g in jax.tree.leaves(grads)]
        np.savez(out, loss=np.asarray(gather(loss)), *leaves)
        print("REWRITTEN" if "passes." in jaxpr else "NOT_REWRITTEN", flush=True)
        print("OK", flush=True)
    finally:
        jax.distributed.shutdown()
""")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two(tmp: str):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXPASSES_CHECK="0",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs, logs = [], []
    try:
        for i in range(2):
            log = open(os.path.join(tmp, f"log{i}.txt"), "w+")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-c", WORKER, str(i), str(port), os.path.join(tmp, f"out{i}.npz")],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + TIMEOUT_S
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                break
    finally:
        for p in procs:  # whichever did not finish in time (or one waited on a dead peer)
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    return [p.returncode for p in procs], texts


def _reference():
    import jax

    import models
    spec = models.get("gpt2-tiny")
    params = spec.init(jax.random.key(0))
    data = spec.batch(jax.random.key(1), 8)
    loss, grads = jax.jit(jax.value_and_grad(spec.loss))(params, data)
    return np.asarray(loss), [np.asarray(g) for g in jax.tree.leaves(grads)]


def test_two_processes_equal_one():
    with tempfile.TemporaryDirectory() as tmp:
        codes, texts = _run_two(tmp)
        for i, (code, text) in enumerate(zip(codes, texts)):
            assert code == 0 and "OK" in text, f"process {i} exited {code}:\n{text[-4000:]}"
            assert "REWRITTEN" in text.split(), text[-2000:]
        results = []
        for i in range(2):
            with np.load(os.path.join(tmp, f"out{i}.npz")) as f:
                results.append((f["loss"], [f[f"arr_{j}"] for j in range(len(f.files) - 1)]))
    loss0, grads0 = _reference()
    for loss, grads in results:
        np.testing.assert_allclose(loss, loss0, rtol=1e-5)
        assert len(grads) == len(grads0)
        for g, g0 in zip(grads, grads0):
            np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-4 * np.max(np.abs(g0)))
