"""Test stand-in for a GPU machine: lets accelerate's FSDP2 run on a CPU (gloo) process group.

Also a one-time SIGKILL of one rank at a given step (CPU_FSDP_KILL), for the resume test.

accelerate 1.16's ``AcceleratorState.__init__`` sets ``DistributedType.FSDP`` only inside its branch
for accelerator process groups (``MULTI_GPU``, ``MULTI_XPU``, ...); a gloo group on CPUs is
``MULTI_CPU`` and the FSDP plugin is dropped. This module, put on ``PYTHONPATH`` by
tests/test_distributed.py only, takes the plugin on a ``MULTI_CPU`` group as the accelerator branch
does. Everything else (``fully_shard`` wrapping, sharded save and load, ``get_state_dict``) is
accelerate's and torch's own code, unchanged. Only ranks (``LOCAL_RANK`` set) import accelerate here.
"""

import os

if "LOCAL_RANK" in os.environ and os.environ.get("ACCELERATE_USE_FSDP") == "true":
    import accelerate.state as _state
    from accelerate.utils import DistributedType

    _original = _state.AcceleratorState.__init__

    def _init(self, *args, fsdp_plugin=None, **kwargs):
        _original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            _state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    _state.AcceleratorState.__init__ = _init

# Fault injection for tests/test_distributed.py and tests/test_multinode.py, off unless
# CPU_FSDP_KILL="<step>:<rank>:<marker file>": that rank (global: RANK, as each agent of a multi-node
# launch numbers its LOCAL_RANK from 0) SIGKILLs itself once, at the end of that optimizer step, and
# leaves the marker (no second kill).
_kill = os.environ.get("CPU_FSDP_KILL")
if _kill and "LOCAL_RANK" in os.environ:
    _step, _rank, _marker = _kill.split(":", 2)
    if int(os.environ.get("RANK", os.environ["LOCAL_RANK"])) == int(_rank) and not os.path.exists(_marker):
        import signal

        from daemon.training import callbacks as _callbacks

        _on_step_end = _callbacks.ProgressCallback.on_step_end

        def _killing_on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(_step):
                open(_marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return _on_step_end(self, args, state, control, **kwargs)

        _callbacks.ProgressCallback.on_step_end = _killing_on_step_end

# CPU_FSDP_FAIL_SETUP="<rank>": that rank (global) fails every attempt's setup with a ConfigError, before the
# ranks compare their plans (tests/test_multinode.py): the others wait in that collective for it.
_fail = os.environ.get("CPU_FSDP_FAIL_SETUP")
if _fail and "LOCAL_RANK" in os.environ and int(os.environ.get("RANK", os.environ["LOCAL_RANK"])) == int(_fail):
    from daemon.exceptions import ConfigError
    from daemon.training import run as _run

    def _failing_setup(*args, **kwargs):
        raise ConfigError(f"rank {_fail} cannot set up this file (injected)")

    _run.setup = _failing_setup
