"""Who a process is under torchrun / accelerate launch (their environment variables), and a plain run untouched.
The process group itself is exercised by tests/test_sharding.py's torchrun runs on gloo."""

import pytest
import torch.distributed as dist

from ldm.distributed import Process, launched, process_from_environment, process_group
from ldm.util import InputError

VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture
def plain(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_plain_run_is_rank_0_of_1_and_starts_no_group(plain):
    assert not launched() and process_from_environment() == Process(0, 1, 0)
    with process_group() as process:
        assert process.is_main and process.world_size == 1 and not dist.is_initialized()
        process.barrier()  # nothing to wait for


def test_the_launchers_variables_say_who_this_is(plain):
    for name, value in zip(VARIABLES, ("3", "4", "1")):
        plain.setenv(name, value)
    process = process_from_environment()
    assert launched() and process == Process(3, 4, 1) and not process.is_main
    assert [k for k in range(10) if process.takes(k)] == [3, 7]


@pytest.mark.parametrize("values, message", [(("1", "x", "0"), "must be integers"), (("4", "4", "0"), "not a rank")])
def test_bad_launcher_variables_are_named(values, message, plain):
    for name, value in zip(VARIABLES, values):
        plain.setenv(name, value)
    with pytest.raises(InputError, match=message):
        process_from_environment()
