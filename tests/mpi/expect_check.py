"""common.expect_everywhere on real ranks: it passes only when every rank raised the error
(with the message asked for), and otherwise fails on every rank alike, naming the ranks that
did not. Usage: expect_check.py"""

from common import WORLD, case, expect_everywhere, progress

rank, size = WORLD.Get_rank(), WORLD.Get_size()
assert size >= 2, "expect_check needs 2 ranks or more"


def block(raises):
    """An expect_everywhere(ValueError, match="lr") block whose body raises ``raises(rank)``
    (nothing where that is None)."""
    with expect_everywhere(ValueError, match="lr"):
        error = raises(rank)
        if error is not None:
            raise error


def fails_everywhere(raises, words):
    """The block fails on this rank with an AssertionError that says each of ``words``."""
    try:
        block(raises)
    except AssertionError as e:
        for w in words:
            assert w in str(e), (w, str(e))
    else:
        raise AssertionError("expect_everywhere passed")


with case("every rank raises: passes, and exposes the exception"):
    with expect_everywhere(ValueError, match=r"lr=-\d") as raised:
        raise ValueError("lr=-1 is negative")
    assert isinstance(raised.value, ValueError) and "negative" in str(raised.value)
    block(lambda r: ValueError(f"lr on rank {r}"))
progress(1)

with case("the last rank does not raise: every rank fails, naming it"):
    fails_everywhere(lambda r: ValueError("bad lr") if r < size - 1 else None,
                     [f"rank(s) [{size - 1}] did not", f"rank {size - 1}: no ValueError"])
progress(2)

with case("rank 0 raises another error: every rank fails, naming it and the error"):
    fails_everywhere(lambda r: KeyError("lr") if r == 0 else ValueError("bad lr"),
                     ["rank(s) [0] did not", "rank 0: KeyError instead"])
progress(3)

with case("rank 1's message does not match: every rank fails, saying so"):
    fails_everywhere(lambda r: ValueError("bad momentum" if r == 1 else "bad lr"),
                     ["rank(s) [1] did not", "'bad momentum'", "does not match 'lr'"])
progress(4)

WORLD.Barrier()
if rank == 0:
    print(f"expect_check OK on {size} ranks", flush=True)
