"""`nci demo`: attestation and key release run end to end, twice on one state folder."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from nci.cli import main


def test_demo_accepts_the_genuine_document_and_refuses_forgeries(tmp_path: Path) -> None:
    for _ in range(2):  # the second run reuses the local CA in the state folder
        out, err = io.StringIO(), io.StringIO()
        status = main(["demo", "--state-dir", str(tmp_path)], out=out, err=err)
        text = out.getvalue()
        assert status == 0, text + err.getvalue()
        assert "=> ACCEPTED" in text
        assert "REFUSED (SignatureInvalid)" in text
        assert "REFUSED (ChainInvalid)" in text
        assert "not by Nitro hardware" in text
        assert "RELEASED: the same data key the provider sealed" in text
        assert text.count("=> REFUSED (AccessDeniedException)") == 2
        assert "UNLOCKED: 3 tensors, identical to the provider's" in text
        assert "REFUSED (BundleIntegrityError" in text
        assert "every forgery, tampering and unattested caller was refused" in text
    assert (tmp_path / "nsm").is_dir()


def test_demo_runs_with_the_default_relative_state_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NCI_STATE_DIR", raising=False)
    out, err = io.StringIO(), io.StringIO()
    assert main(["demo"], out=out, err=err) == 0, out.getvalue() + err.getvalue()
    assert (tmp_path / ".nci" / "nsm").is_dir()
