"""client/client.py: what the command-line clients check before they send."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from client.client import temperature_arg
from protos.lockstep.v1 import lockstep_pb2 as pb
from server.runtime.sampling import SamplingParams


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e-300", "2.93e-240", "1e-45", "0.005", "-1", "100.5",
                                  "1e39", "abc", ""])
def test_a_temperature_the_server_would_refuse_or_read_as_another_is_a_cli_error(text):
    with pytest.raises(argparse.ArgumentTypeError):
        temperature_arg(text)


@given(st.floats())
def test_every_temperature_the_cli_takes_arrives_as_one_the_server_serves(t):
    """Whatever `--temperature` accepts, the float32 the request carries is a temperature the
    engine serves, 0 only when 0 was given."""
    try:
        value = temperature_arg(repr(t))
    except argparse.ArgumentTypeError:
        return
    wire = pb.SamplingParams(temperature=value).temperature
    SamplingParams(temperature=wire)  # raises for a temperature out of range
    assert (wire == 0.0) == (t == 0.0)
