"""assert_artifact_matches: the raising comparison of lowering, in verify's (want, got) order."""

from __future__ import annotations

import pytest
import torch

from fxopt.errors import LoweringError
from fxopt.lowering import assert_artifact_matches
from fxopt.verify import Tolerance, compare_outputs


def test_want_then_got_like_verify_and_it_raises():
    want = (torch.ones(3), torch.arange(3))
    assert_artifact_matches(want, (torch.ones(3) + 1e-7, torch.arange(3)))
    assert compare_outputs(want, (torch.ones(3) + 1e-7, torch.arange(3))).ok()
    with pytest.raises(LoweringError, match="output 0"):
        assert_artifact_matches(want, (torch.ones(3) * 2, torch.arange(3)))
    with pytest.raises(LoweringError, match="output 1"):
        assert_artifact_matches(want, (torch.ones(3), torch.arange(3) + 1))
    with pytest.raises(LoweringError, match="returns"):
        assert_artifact_matches(want, [torch.ones(3)])
    # the scale is the first argument's (want's): 1e-3 off a reference of 1 is 1e-3 relative
    assert_artifact_matches(torch.ones(3), torch.ones(3) + 1e-3, Tolerance(rtol=2e-3, atol=0))
    with pytest.raises(LoweringError):
        assert_artifact_matches(torch.ones(3) * 1e-3, torch.ones(3) * 2e-3,
                                Tolerance(rtol=0.5, atol=0))
