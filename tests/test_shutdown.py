"""mpisign.mpi.shutdown: a survivor's exit is bounded (#31: an elastic job that finished never
exited). Real processes: a finalize that never returns is ended by the watchdog with the status
the process was exiting with; the library's own MPI_Finalize, called through ctypes, returns."""

import subprocess
import sys
import textwrap
import time


def python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)


def test_a_finalize_that_never_returns_is_ended_by_the_watchdog():
    start = time.monotonic()
    done = python("""
        import time
        from mpisign.mpi import shutdown
        print("work done", flush=True)
        shutdown.finalize_within(1.0, finalize=lambda: time.sleep(120))
        print("never here", flush=True)
    """)
    assert time.monotonic() - start < 60
    assert done.returncode == 0, done.stderr
    assert "work done" in done.stdout and "never here" not in done.stdout
    assert "MPI_Finalize did not return within 1 s" in done.stderr


def test_the_watchdog_keeps_the_status_of_an_uncaught_error():
    done = python("""
        import time
        from mpisign.mpi import shutdown
        shutdown.finalize_within(1.0, finalize=lambda: time.sleep(120), status=lambda: 1)
    """)
    assert done.returncode == 1, done.stderr
    done = python("""
        import atexit
        from mpisign.mpi import shutdown
        shutdown.arm()
        atexit.register(lambda: print("status", shutdown._exit_status(), flush=True))
        raise RuntimeError("the user's error")
    """)
    assert "status 1" in done.stdout and done.returncode == 1, (done.stdout, done.stderr)


def test_the_library_s_own_finalize_returns_and_an_armed_exit_is_clean():
    done = python("""
        from mpi4py import MPI
        from mpisign.mpi import shutdown
        print("returned", shutdown.finalize_within(30.0), MPI.Is_finalized(), flush=True)
    """)
    assert done.returncode == 0 and "returned True True" in done.stdout, done.stderr
    done = python("""
        from mpisign.mpi import shutdown
        shutdown.arm()
        shutdown.arm()
        print("armed", flush=True)
    """)
    assert done.returncode == 0 and done.stdout == "armed\n", done.stderr
    assert "did not return" not in done.stderr
