"""CUDA-aware MPI detection for each combination of settings, and host staging with CPU stand-ins.

No MPI is initialized here: the MPI library's own answer comes from stand-in modules.
"""

import logging
import os
import types

import numpy as np
import pytest
import torch

from mpisign.cuda import aware


VERSIONS = {"openmpi": "Open MPI v5.0.8, package: Open MPI", "mpich": "MPICH Version: 4.2.3",
            "cray-mpich": "MPI VERSION    : CRAY MPICH version 8.1.30",
            "mvapich": "MVAPICH2 Version      :\t2.3.7", "intel": "Intel(R) MPI Library 2021.13"}


def fake_mpi(answer=None, library=None):
    """A stand-in for mpi4py.MPI: with Query_cuda_support() returning ``answer`` (an exception
    to raise it), or without that function when ``answer`` is None; Get_library_version()
    naming ``library`` (a key of VERSIONS), or absent when None."""
    mod = types.SimpleNamespace(__name__="fake_mpi")
    if isinstance(answer, Exception):
        def query():
            raise answer
        mod.Query_cuda_support = query
    elif answer is not None:
        mod.Query_cuda_support = lambda: answer
    if library is not None:
        mod.Get_library_version = lambda: VERSIONS[library]
    return mod


# (settings, library answer, running library, UCX loaded, expected decision, a word the
# reason must contain)
CASES = [
    ({}, None, None, False, False, "no setting"),
    ({}, 0, "openmpi", False, False, "= 0"),
    ({}, 1, "openmpi", False, True, "= 1"),
    ({}, True, None, False, True, "= 1"),
    ({}, -1, None, False, False, "no setting"),  # unknown
    ({}, RuntimeError("binding"), None, False, False, "no setting"),
    ({"MPISIGN_CUDA_AWARE": "1"}, 0, "openmpi", True, True, "override"),
    ({"MPISIGN_CUDA_AWARE": "0"}, 1, "openmpi", True, False, "override"),
    ({"MPISIGN_CUDA_AWARE": "0", "MPICH_GPU_SUPPORT_ENABLED": "1"}, None, "cray-mpich", False,
     False, "override"),
    ({"MPISIGN_CUDA_AWARE": "true"}, None, None, False, True, "override"),
    # The library's answer is final, whatever the settings say (the shipped multinode script
    # exports Cray MPICH's and UCX's settings for every MPI).
    ({"MPICH_GPU_SUPPORT_ENABLED": "1", "UCX_TLS": "rc,cuda_copy", "UCX_MEMTYPE_CACHE": "n"}, 0,
     "openmpi", True, False, "= 0"),
    ({"UCX_TLS": "rc,sm"}, 1, "openmpi", True, True, "= 1"),
    # Settings count only for the library they belong to.
    ({"MPICH_GPU_SUPPORT_ENABLED": "1"}, None, "cray-mpich", False, True,
     "MPICH_GPU_SUPPORT_ENABLED"),
    ({"MPICH_GPU_SUPPORT_ENABLED": "1"}, None, "openmpi", False, False, "no setting"),
    ({"MPICH_GPU_SUPPORT_ENABLED": "1"}, None, None, False, False, "unknown MPI library"),
    ({"MPICH_GPU_SUPPORT_ENABLED": "0"}, None, "cray-mpich", False, False,
     "MPICH_GPU_SUPPORT_ENABLED"),
    ({"MPIR_CVAR_ENABLE_GPU": "1"}, None, "mpich", False, False, "no setting"),  # the default
    ({"MPIR_CVAR_ENABLE_GPU": "0"}, None, "mpich", False, False, "turns off"),
    ({"MV2_USE_CUDA": "1"}, None, "mvapich", False, True, "MV2_USE_CUDA"),
    ({"MV2_USE_CUDA": "1"}, None, "mpich", False, False, "no setting"),
    ({"OMPI_MCA_opal_cuda_support": "true"}, None, "openmpi", False, True,
     "OMPI_MCA_opal_cuda_support"),
    ({"OMPI_MCA_opal_cuda_support": "false", "UCX_TLS": "cuda_copy"}, None, "openmpi", True,
     False, "turns off"),
    # UCX's settings only where MPI runs on UCX.
    ({"UCX_TLS": "rc,sm,cuda_copy,cuda_ipc"}, None, "openmpi", True, True, "UCX_TLS"),
    ({"UCX_TLS": "rc,sm,cuda_copy,cuda_ipc"}, None, "openmpi", False, False, "no setting"),
    ({"UCX_TLS": "rc,sm"}, None, "openmpi", True, False, "UCX_TLS"),
    ({"UCX_TLS": "rc,sm", "MPICH_GPU_SUPPORT_ENABLED": "1"}, None, "cray-mpich", True, False,
     "UCX_TLS"),   # an off wins
    ({"UCX_TLS": "^cuda_ipc"}, None, "mpich", True, False, "no setting"),  # cuda_copy still on
    ({"UCX_TLS": "^cuda"}, None, "mpich", True, False, "UCX_TLS"),
    ({"UCX_TLS": "all"}, None, "mpich", True, False, "no setting"),
    ({"UCX_TLS": "all", "UCX_MEMTYPE_CACHE": "n"}, None, "mpich", True, True,
     "UCX_MEMTYPE_CACHE"),
    ({"UCX_MEMTYPE_CACHE": "n"}, None, "intel", False, False, "no setting"),
    ({"UCX_MEMTYPE_CACHE": "y"}, None, "mpich", True, False, "no setting"),
    ({"UCX_MEMTYPE_CACHE": "n", "UCX_TLS": "tcp"}, None, "mpich", True, False, "UCX_TLS"),
]


@pytest.mark.parametrize("env, answer, library, ucx, expected, word", CASES)
def test_detection(env, answer, library, ucx, expected, word):
    got, reason = aware.detect_cuda_aware(fake_mpi(answer, library), env, ucx=ucx)
    assert got is expected, reason
    assert word in reason


def test_the_running_library_is_named():
    for library, version in VERSIONS.items():
        assert aware.library_of(fake_mpi(library=library)) == library, version
    assert aware.library_of(fake_mpi()) is None and aware.library_of(None) is None
    from mpi4py import MPI
    # This machine's, by another source than the version string that library_of reads: the
    # vendor mpi4py was built for (MPICH's covers Cray's).
    vendor = MPI.get_vendor()[0]
    named = {"Open MPI": ["openmpi"], "MPICH": ["mpich", "cray-mpich"], "Intel MPI": ["intel"],
             "MVAPICH": ["mvapich"], "MVAPICH2": ["mvapich"]}
    assert aware.library_of(MPI) in named[vendor], (vendor, aware.library_of(MPI))


def test_this_machines_open_mpi_is_detected_as_it_was_built():
    """The real library, not a stand-in: with no settings, the decision is the library's own
    answer, and an Open MPI that ompi_info says was built without CUDA support answers 0."""
    import subprocess
    from pathlib import Path

    from mpi4py import MPI

    from mpisign import launch
    if aware.library_of(MPI) != "openmpi":
        pytest.skip("ompi_info is Open MPI's")
    ompi_info = Path(launch.find_mpiexec()).parent / "ompi_info"
    if not ompi_info.exists():
        pytest.skip(f"no ompi_info beside {launch.find_mpiexec()}")
    info = subprocess.run([str(ompi_info), "--parsable", "--all"], capture_output=True,
                          text=True, timeout=60).stdout
    built = {line.rsplit(":", 1)[1] for line in info.splitlines()
             if line.startswith("mca:mpi:base:param:mpi_built_with_cuda_support:value:")}
    assert built in ({"true"}, {"false"}), built
    got, reason = aware.detect_cuda_aware(MPI, {}, ucx=False)
    assert "the MPI library's own answer" in reason, reason   # Open MPI 5 always answers
    if built == {"false"}:
        assert got is False and "MPIX_Query_cuda_support() = 0" in reason, reason


def test_override_must_be_a_boolean():
    with pytest.raises(ValueError, match="MPISIGN_CUDA_AWARE"):
        aware.detect_cuda_aware(fake_mpi(), {"MPISIGN_CUDA_AWARE": "maybe"})


def test_defaults_do_not_touch_mpi(monkeypatch):
    """With no module given and mpi4py.MPI not imported, detection reads only the environment."""
    monkeypatch.delitem(__import__("sys").modules, "mpi4py.MPI", raising=False)
    assert aware.detect_cuda_aware(None, {"MPISIGN_CUDA_AWARE": "1"})[0] is True
    aware_, reason = aware.detect_cuda_aware(None, {"MV2_USE_CUDA": "1"}, ucx=False)
    assert aware_ is False and "unknown MPI library" in reason   # whose setting? none counts


def test_symbol_lookup_in_loaded_libraries():
    getpid = aware._loaded_symbol("libc", "getpid")
    assert getpid is not None and getpid() == os.getpid()
    assert aware._loaded_symbol("libc", "MPIX_no_such_function") is None


def test_the_path_is_logged_once_and_loudly_when_staging(caplog):
    env = {"MV2_USE_CUDA": "no"}  # a decision no other test logs
    with caplog.at_level(logging.INFO, logger="mpisign.cuda.aware"):
        for _ in range(3):
            assert aware.use_device_buffers(fake_mpi(library="mvapich"), env) is False
        for _ in range(2):
            assert aware.use_device_buffers(fake_mpi(1, "mvapich"), env) is True
    records = [r for r in caplog.records if r.name == "mpisign.cuda.aware"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.INFO]
    assert "staging" in records[0].getMessage() and "MV2_USE_CUDA" in records[0].getMessage()


# ---- staging ----------------------------------------------------------------------------------

def test_staging_round_trip_counts_bytes_and_reuses_buffers():
    st = aware.Staging(pin_memory=False)  # CPU stand-in for device memory
    words = torch.from_numpy(np.random.default_rng(0).integers(0, 2**64, 37, dtype=np.uint64))
    sent = st.to_host(words)
    assert np.array_equal(sent, words.numpy())
    assert st.bytes_to_host == words.numel() * 8 and st.allocations == 1
    first = st.buffer("send", 0).data_ptr()
    for _ in range(5):  # same size: no reallocation, same memory
        st.to_host(words)
    assert st.allocations == 1 and st.buffer("send", 0).data_ptr() == first
    assert st.bytes_to_host == 6 * words.numel() * 8
    st.to_host(words[:10])  # smaller: still no reallocation
    assert st.allocations == 1
    big = torch.zeros(100, dtype=torch.uint64)
    st.to_host(big)  # larger: one reallocation
    assert st.allocations == 2 and st.bytes_to_host == (6 * 37 + 10 + 100) * 8

    # Receive side: MPI fills a host array, then it goes to the "device" (here a CPU tensor).
    m, w = 3, 37
    recv = st.host("recv", (m, w))
    assert recv.shape == (m, w) and recv.dtype == np.uint64
    recv[...] = np.arange(m * w, dtype=np.uint64).reshape(m, w)
    out = torch.empty((m, w), dtype=torch.uint64)
    assert st.to_device("recv", out) is out
    assert np.array_equal(out.numpy(), recv)
    assert st.bytes_to_device == m * w * 8 and st.allocations == 3
    st.host("recv", (m, w))
    st.to_device("recv", out)
    assert st.allocations == 3 and st.bytes_to_device == 2 * m * w * 8


def test_staging_keeps_any_dtype_bitwise():
    st = aware.Staging(pin_memory=False)
    x = torch.randn(10).to(torch.bfloat16)
    host = st.to_host(x, slot="params")
    assert np.array_equal(host, x.view(torch.int16).numpy())
    y = torch.empty_like(x)
    st.to_device("params", y)
    assert torch.equal(y.view(torch.int16), x.view(torch.int16))


def test_staging_rejects_misuse():
    st = aware.Staging(pin_memory=False)
    with pytest.raises(ValueError):
        st.to_host(torch.zeros(4, 4)[:, 0])  # not contiguous
    with pytest.raises(ValueError):
        st.to_device("never-filled", torch.zeros(3))
    st.host("recv", 4)
    with pytest.raises(ValueError):
        st.to_device("recv", torch.zeros(5, dtype=torch.uint64))  # larger than the slot holds


def test_sync_for_mpi_on_cpu_is_a_no_op():
    aware.sync_for_mpi("cpu")
    aware.sync_for_mpi(torch.device("cpu"))


def test_sync_for_mpi_synchronizes_once_a_phase(monkeypatch):
    """The first post of a phase synchronizes the stream; a later one (settled) only queries it,
    and synchronizes again only when work was queued since."""
    calls = []

    class Stream:
        busy = True

        def query(self):
            calls.append("query")
            return not self.busy

        def synchronize(self):
            calls.append("synchronize")
            self.busy = False

    stream = Stream()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: stream)
    aware.sync_for_mpi("cuda:0")
    aware.sync_for_mpi("cuda:0", settled=True)
    assert calls == ["synchronize", "query"]
    stream.busy = True   # a kernel queued mid-phase: waited for, not skipped
    aware.sync_for_mpi("cuda:0", settled=True)
    assert calls[2:] == ["query", "synchronize"]


# ---- which GPU path the optimizer and majority_vote take ---------------------------------------

@pytest.mark.parametrize("setting, resident", [("1", True), ("0", False)])
def test_device_path_follows_the_detection(monkeypatch, caplog, setting, resident):
    from mpisign.cuda import bridge, kernels
    monkeypatch.setattr(bridge, "_paths", {})
    monkeypatch.setattr(kernels, "available", lambda device: True)  # stand-in: kernels pass
    monkeypatch.setenv(aware.OVERRIDE_ENV, setting)
    with caplog.at_level(logging.INFO, logger="mpisign.cuda"):
        path = bridge.device_path(torch.device("cuda", 0))
    assert path.resident is resident
    assert isinstance(path, bridge.ResidentSigns if resident else bridge.CudaSigns)
    assert bridge.device_path(torch.device("cuda", 0)) is path  # decided once per device
    said = caplog.text
    assert ("straight to CUDA-aware MPI" in said) is resident and ("staged" in said) is not resident
    # The staged path is there for tensors the resident one cannot take (mixed devices).
    assert isinstance(bridge.staged_path(torch.device("cuda", 0)), bridge.CudaSigns)


def test_no_gpu_path_when_the_kernels_fail(monkeypatch, caplog):
    from mpisign.cuda import bridge, kernels
    monkeypatch.setattr(bridge, "_paths", {})
    monkeypatch.setattr(kernels, "available", lambda device: False)
    with caplog.at_level(logging.ERROR, logger="mpisign.cuda"):
        assert bridge.device_path(torch.device("cuda", 0)) is None
        assert bridge.staged_path(torch.device("cuda", 0)) is None
    assert "CPU reference path" in caplog.text


def test_a_device_left_unusable_by_the_self_check_is_a_fault_not_a_fallback(monkeypatch, caplog):
    """After a sticky fault the CPU fallback would itself fail on the dead context (its copies
    to the host): the level says FAULTED, which stops every rank (startup.agree), and the log
    says why; a device that still works falls back to the host reference."""
    from mpisign.cuda import bridge, kernels, startup
    monkeypatch.setattr(bridge, "_paths", {})
    monkeypatch.setattr(kernels, "available", lambda device: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def dead(device=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", dead)
    with caplog.at_level(logging.ERROR, logger="mpisign.cuda"):
        assert bridge.local_level(torch.device("cuda", 0)) == startup.FAULTED
    assert "unusable" in caplog.text and "illegal memory access" in caplog.text
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: torch.empty(0))   # stand-in allocation
    assert bridge.local_level(torch.device("cuda", 1)) == startup.HOST
    assert bridge.agreed_level([]) is None   # no CUDA tensors, no communicator: no opinion


def test_resident_words_on_cpu_stand_ins():
    """ResidentSigns with the kernels run by the host shim: pack into a slice of device words,
    the tally kernel as a collective's tally, unpack (+0 at ties), disagreement."""
    from mpisign.backends import packing
    from mpisign.collectives.base import check_words
    from mpisign.cuda import emulate
    from mpisign.cuda.bridge import ResidentSigns
    if emulate.compiler() is None:
        pytest.skip("no C++ compiler for the emulated kernels")
    gen = torch.Generator().manual_seed(5)
    n, m = 1000, 4
    xs = [torch.randn(n, generator=gen) for _ in range(m)]
    with emulate.kernels_on_cpu() as kernels:
        gpu = ResidentSigns("cpu", kernels)
        votes = gpu.words(m * packing.n_words(n)).view(m, -1)
        for r, x in enumerate(xs):
            gpu.pack(x, r % 2, votes[r])
            check_words(votes[r])  # what the collectives take
            assert np.array_equal(votes[r].numpy().view(np.uint64), packing.pack_signs(x, r % 2))
        plus, tie = gpu.tally(votes, n)
        assert plus.dtype == torch.int64 and tie is not None
        want_plus, want_tie = packing.majority(packing.tally(votes.numpy().view(np.uint64)), m, n)
        assert np.array_equal(plus.numpy().view(np.uint64), want_plus)
        v = gpu.unpack(plus, tie, n, torch.empty(0, dtype=torch.bfloat16))
        assert v.dtype == torch.bfloat16
        assert torch.equal(v.float(), packing.unpack_signs(want_plus, n, want_tie))
        assert not torch.signbit(v[v == 0]).any()  # a tie is +0.0
        assert int(gpu.disagreement(votes[1], plus, tie, n)) == \
            packing.disagreement(votes[1].numpy().view(np.uint64), want_plus, want_tie)


def test_collectives_take_only_word_arrays():
    from mpisign.collectives.base import check_words
    for bad in (np.zeros(4, np.int64), np.zeros((2, 2), np.uint64),
                torch.zeros(4, dtype=torch.int32), torch.zeros(8, dtype=torch.int64)[::2], [1, 2]):
        with pytest.raises(ValueError, match="words"):
            check_words(bad)
    check_words(np.zeros(3, np.uint64))
    check_words(torch.zeros(3, dtype=torch.int64))


def test_staged_path_on_cpu_stand_ins():
    """CudaSigns (MPI not CUDA-aware) with the kernels run by the host shim: pack and apply give
    the CPU reference's bits; a bucket's packs reach the host in one copy and one wait
    (settle), and nothing before it; the staging buffers are allocated once, whatever the order
    of parameter sizes, with exactly the packed words staged each way."""
    from mpisign.backends import packing
    from mpisign.cuda import emulate
    from mpisign.cuda.bridge import CudaSigns
    if emulate.compiler() is None:
        pytest.skip("no C++ compiler for the emulated kernels")
    gen = torch.Generator().manual_seed(9)
    with emulate.kernels_on_cpu() as kernels:
        gpu = CudaSigns("cpu", kernels, pin_memory=False)
        copies = []
        to_host = gpu.staging.to_host
        gpu.staging.to_host = lambda t, slot="send": copies.append(t.numel()) or to_host(t, slot)
        words_moved = 0
        for step in range(5):
            sizes = (5000, 70, 1) if step < 2 else (1, 5000, 70, 9000)  # larger: it grows
            xs = [torch.randn(n, generator=gen) for n in sizes]
            outs = [np.zeros(packing.n_words(n), np.uint64) for n in sizes]
            copies.clear()
            for x, out in zip(xs, outs):
                gpu.pack(x, step % 2, out)
            assert gpu.mark() is None   # nothing is queued on a CPU stand-in's stream
            if step in (1, 3, 4):   # the device buffer has grown to fit a step (doubling)
                assert copies == [] and not any(out.any() for out in outs)   # queued only
            gpu.settle()
            if step in (1, 3, 4):
                assert len(copies) == 1, copies   # one copy, one wait, for all the packs
            for x, out in zip(xs, outs):
                assert np.array_equal(out, packing.pack_signs(x, step % 2))
                n = x.numel()
                plus, tie = packing.majority(packing.tally(np.stack([out, ~out, out, out])), 4, n)
                tie[0] |= np.uint64(0b1010)  # some ties, to stage the tie mask too
                p = torch.randn(n, generator=gen)
                want = p.clone()
                packing.apply_signs(want, plus, tie, 0.01, 0.001)
                gpu.apply(p, plus, tie, 0.01, 0.001)
                assert torch.equal(p, want), n
                words_moved += out.size
            if step == 3:   # every rotating slot has seen its size by now
                allocations = gpu.staging.allocations
        # send, and plus and tie in each of the rotating slots; then only the larger ones.
        assert gpu.staging.allocations == allocations
        assert gpu.staging.bytes_to_host == 8 * words_moved
        assert gpu.staging.bytes_to_device == 2 * 8 * words_moved


def test_cupy_takes_torch_streams_by_what_each_library_has():
    """CuPy >= 14's Stream.from_external needs torch >= 2.10's __cuda_stream__; with an older
    torch the raw handle goes to ExternalStream, and with neither the error says what to do."""
    from types import SimpleNamespace

    from mpisign.cuda.kernels import _external_stream

    calls = []
    old_torch_stream = SimpleNamespace(cuda_stream=1234)
    new_torch_stream = SimpleNamespace(cuda_stream=1234, __cuda_stream__=lambda: (0, 1234))

    def cupy(from_external: bool, external: bool):
        stream = type("Stream", (), {})
        if from_external:
            stream.from_external = staticmethod(lambda s: calls.append(("from_external", s)))
        cuda = SimpleNamespace(Stream=stream)
        if external:
            cuda.ExternalStream = lambda handle, dev: calls.append(("ExternalStream", handle, dev))
        return SimpleNamespace(cuda=cuda)

    _external_stream(cupy(True, True), new_torch_stream, 0)
    _external_stream(cupy(True, True), old_torch_stream, 1)      # CuPy 14, torch < 2.10
    _external_stream(cupy(False, True), new_torch_stream, 2)     # CuPy < 14
    assert calls == [("from_external", new_torch_stream), ("ExternalStream", 1234, 1),
                     ("ExternalStream", 1234, 2)]
    with pytest.raises(RuntimeError, match="torch >= 2.10"):
        _external_stream(cupy(True, False), old_torch_stream, 0)


def test_cupy_views_of_streams_and_kernels_are_made_once(monkeypatch):
    """A kernel call builds no stream wrapper and looks up no kernel: one wrapper per torch
    stream (by handle), one lookup per kernel and device."""
    from types import SimpleNamespace

    from mpisign.cuda import kernels

    made, looked_up = [], []
    cupy = SimpleNamespace(cuda=SimpleNamespace(
        Stream=type("Stream", (), {}),
        ExternalStream=lambda handle, dev: made.append((handle, dev)) or ("stream", handle)))
    monkeypatch.setattr(kernels, "_streams", {})
    for handle in (11, 11, 12, 11):
        kernels._cupy_stream(cupy, SimpleNamespace(cuda_stream=handle), 0)
    assert made == [(11, 0), (12, 0)]
    module = SimpleNamespace(get_function=lambda name: looked_up.append(name) or name)
    monkeypatch.setattr(kernels, "_module", lambda index: module)
    kernels._function.cache_clear()
    try:
        for _ in range(3):
            assert kernels._function(0, "pack_f32") == "pack_f32"
        assert looked_up == ["pack_f32"]
    finally:
        kernels._function.cache_clear()


def test_device_buffers_go_to_mpi_under_their_own_device():
    """A tensor on cuda:k is handed to mpi4py inside torch.cuda.device(k) (DLPack refuses to
    export from another current device); host buffers under no context at all."""
    import contextlib

    from mpisign.collectives.base import device_of

    class OnGpu3(torch.Tensor):   # a CPU stand-in that says it lives on cuda:3
        is_cuda = property(lambda self: True)
        device = property(lambda self: torch.device("cuda", 3))

    ctx = device_of(torch.zeros(2).as_subclass(OnGpu3))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 3
    assert isinstance(device_of(torch.zeros(2)), contextlib.nullcontext)
    assert isinstance(device_of(np.zeros(2, np.uint64)), contextlib.nullcontext)


def test_overlap_with_cuda_parameters_needs_mpi_thread_multiple():
    """Hooks of CUDA tensors run on autograd's device thread: below MPI_THREAD_MULTIPLE the
    first step refuses overlap with a clear error; CPU tensors (hooks on the caller's thread)
    and MPI_THREAD_MULTIPLE pass."""
    from mpi4py import MPI

    from mpisign.optim.overlap import check_threads

    class OnGpu(torch.Tensor):
        is_cuda = property(lambda self: True)

    gpu = [torch.zeros(2).as_subclass(OnGpu)]
    for level in (MPI.THREAD_SINGLE, MPI.THREAD_FUNNELED, MPI.THREAD_SERIALIZED):
        with pytest.raises(RuntimeError, match="MPI_THREAD_MULTIPLE.*overlap=False"):
            check_threads(gpu, query=lambda level=level: level)
    check_threads(gpu, query=lambda: MPI.THREAD_MULTIPLE)
    check_threads([torch.zeros(2)], query=lambda: MPI.THREAD_SINGLE)



def test_the_ranks_agree_on_one_gpu_path_and_prove_device_words():
    """On 3 real ranks with CPU stand-ins for device words (startup_check.py): the most
    conservative level wins everywhere, a faulted device stops every rank, and the resident path
    is proven by a checked transfer between ranks; wrong bits put every rank on staging."""
    import mpirun
    out = mpirun.run(3, "startup_check.py", timeout=120)
    assert "startup_check OK on 3 ranks" in out
