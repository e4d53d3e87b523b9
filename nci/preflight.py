"""``nci parent check``: the read-only preflight an operator runs before starting the services.

It compares what is deployed with the ``deployment`` section of the parent's configuration
(:class:`parent.config.DeploymentConfig`), one check per line:

1. ``eif``: the AWS launcher's image file measures to ``deployment.expected``
   (:func:`attestation.eif.measure_eif`, the PCRs Nitro will put in the attestation document);
2. ``launcher``: the AWS launcher's sizes can boot that image: ``memory_mib`` at least 4 × the
   EIF's size in MiB, rounded up (what ``nitro-cli run-enclave`` requires), and ``cpu_count`` even
   and at least 2 (an enclave takes whole cores: both hyperthreads of each);
3. ``kms``: the key policy (``GetKeyPolicy``) passes :func:`kms_policy.check` with the expected
   measurements, plus ``deployment.rollout``'s during a rollout: ``kms:Decrypt`` only for them;
4. ``bundle NAME``: each sealed bundle is published: ``HeadObject`` on the S3 manifest, which
   ``nci provider publish`` uploads last (the key :class:`parent.bundlesource.S3Source` reads),
   or the manifest file of a folder source.

Nothing is written or started. AWS errors (AccessDenied, NotFound, timeouts) are failed checks that
name the error code, never tracebacks; the clients have bounded timeouts and retries
(:mod:`nci._aws`). Exit status: 0 every check passed, 1 one failed or none ran (every check
skipped: "nothing checked" is no pass), 2 a bad configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Literal, TextIO

from botocore.exceptions import BotoCoreError, ClientError

from attestation.eif import EifError, measure_eif
from kms_policy import KeyPolicy, check
from kms_policy.errors import KmsPolicyError
from nci._aws import client
from parent.bundlesource import MANIFEST_NAME, s3_keys
from parent.config import (
    AwsLauncherConfig,
    BundleSourceConfig,
    DeploymentConfig,
    ParentConfig,
    load_config,
)
from protocol.errors import ProtocolError

__all__ = ["CHECKS", "EIF_MEMORY_FACTOR", "Outcome", "add_check_parser", "preflight"]

CHECKS = ("eif", "launcher", "kms", "bundles")
EIF_MEMORY_FACTOR = 4  # nitro-cli run-enclave: memory at least 4 x the EIF file size
MIB = 1024 * 1024
Status = Literal["ok", "FAIL", "skip"]
ClientFactory = Callable[[str], Any]  # "kms" or "s3" -> a boto3 client


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One check: its name, ``ok``/``FAIL``/``skip``, why, and structured details for --json."""

    name: str
    status: Status
    detail: str
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, **self.data}


def add_check_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "check",
        help="read-only preflight: the EIF's PCRs, the key policy, the published bundles",
        description="Compare the deployment with parent.yaml's deployment section before "
        "starting the services. Exit 0 all passed, 1 a check failed (or every check was "
        "skipped), 2 a bad configuration.",
    )
    parser.add_argument("--config", required=True, type=Path, metavar="FILE")
    parser.add_argument(
        "--skip", action="append", default=[], choices=CHECKS, help="leave a check out (repeatable)"
    )
    parser.add_argument("--endpoint-url", help="KMS and S3 endpoint (a local one, for example)")
    parser.add_argument(
        "--region",
        help="AWS region (default: the key ARN's, else bundles.region, else the AWS "
        "environment's: AWS_REGION, AWS_DEFAULT_REGION or the profile's)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_check_command)


def _check_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        config = load_config(args.config)
    except ProtocolError as exc:
        print(f"nci parent check: {exc}", file=err)
        return 2
    if args.endpoint_url is not None and not args.endpoint_url.startswith(("http://", "https://")):
        print("nci parent check: --endpoint-url must be an http(s) URL", file=err)
        return 2

    def factory(service: str) -> Any:
        region = args.region or _region(config, service)
        endpoint = args.endpoint_url
        if service == "s3" and endpoint is None and config.bundles is not None:
            endpoint = config.bundles.endpoint_url
        return client(service, endpoint_url=endpoint, region=region)

    outcomes = preflight(config, client=factory, skip=args.skip)
    failed = any(o.status == "FAIL" for o in outcomes)
    # every check skipped: nothing was verified, which must not read as a pass
    nothing = not any(o.status != "skip" for o in outcomes)
    if args.json:
        document: dict[str, Any] = {
            "ok": not (failed or nothing),
            "checks": [o.to_json() for o in outcomes],
        }
        if nothing:
            document["error"] = "nothing checked"
        json.dump(document, out, indent=2)
        out.write("\n")
    else:
        for outcome in outcomes:
            line = f"{outcome.status:<4}  {outcome.name}: {outcome.detail}"
            # a policy's text reaches the terminal through the findings: escape what it interprets
            out.write("".join(c if c.isprintable() else repr(c)[1:-1] for c in line) + "\n")
    if nothing:
        print("nci parent check: nothing checked (every check was skipped)", file=err)
    return 1 if failed or nothing else 0


def _region(config: ParentConfig, service: str) -> str | None:
    deployment = config.deployment
    if service == "kms" and deployment is not None and deployment.key_id.startswith("arn:"):
        return deployment.key_id.split(":")[3]
    return config.bundles.region if config.bundles is not None else None


def preflight(
    config: ParentConfig, *, client: ClientFactory, skip: Collection[str] = ()
) -> list[Outcome]:
    """Run every check not in ``skip`` (names from :data:`CHECKS`); never raises on what AWS or
    the files say. ``client("kms")``/``client("s3")`` make the boto3 clients, only when needed."""
    outcomes: list[Outcome] = []
    deployment = config.deployment
    if "eif" in skip:
        outcomes.append(Outcome("eif", "skip", "--skip eif"))
    elif isinstance(config.launcher, AwsLauncherConfig):
        outcomes.append(check_eif(config.launcher.eif_path, deployment))
    else:
        outcomes.append(Outcome("eif", "skip", "no launcher.aws section: no image to measure"))
    if "launcher" in skip:
        outcomes.append(Outcome("launcher", "skip", "--skip launcher"))
    elif isinstance(config.launcher, AwsLauncherConfig):
        outcomes.append(check_launcher(config.launcher))
    else:
        outcomes.append(Outcome("launcher", "skip", "no launcher.aws section: no enclave to size"))
    if "kms" in skip:
        outcomes.append(Outcome("kms", "skip", "--skip kms"))
    elif deployment is None:
        outcomes.append(Outcome("kms", "FAIL", "no deployment section (key_id, expected)"))
    else:
        outcomes.append(check_key_policy(_lazy(client, "kms"), deployment))
    if config.bundles is not None:
        s3 = _lazy(client, "s3")
        for name, source in config.bundles.sources.items():
            if "bundles" in skip:
                outcomes.append(Outcome(f"bundle {name}", "skip", "--skip bundles"))
            else:
                outcomes.append(check_bundle(name, source, s3))
    return outcomes


def check_eif(path: Path, deployment: DeploymentConfig | None) -> Outcome:
    """(1) The image file's PCRs against ``deployment.expected``."""
    name = "eif"
    if deployment is None:
        return Outcome(name, "FAIL", "no deployment section: no expected measurements")
    try:
        with path.open("rb") as handle:
            measured = measure_eif(handle)
    except FileNotFoundError:
        return Outcome(name, "FAIL", f"{path} does not exist")
    except OSError as exc:
        return Outcome(name, "FAIL", f"cannot read {path}: {exc.strerror or type(exc).__name__}")
    except EifError as exc:
        return Outcome(name, "FAIL", f"{path} is not a valid EIF: {exc}")
    actual = {f"PCR{i}": v.hex() for i, v in sorted(measured.items())}
    mismatches = [
        f"PCR{index}: expected {value.hex()}, the image has "
        f"{measured[index].hex() if index in measured else 'none (unsigned image)'}"
        for index, value in sorted(deployment.expected.items())
        if measured.get(index) != value
    ]
    if mismatches:
        return Outcome(name, "FAIL", f"{path}: " + "; ".join(mismatches), {"pcrs": actual})
    pinned = ", ".join(f"PCR{i}" for i in sorted(deployment.expected))
    return Outcome(name, "ok", f"{path}: {pinned} match deployment.expected", {"pcrs": actual})


def check_launcher(launcher: AwsLauncherConfig) -> Outcome:
    """(2) The enclave's sizes against the image: ``nitro-cli run-enclave`` refuses less memory
    than 4 × the EIF, and an enclave takes whole cores (an even vCPU count)."""
    name = "launcher"
    path = launcher.eif_path
    try:
        size = path.stat().st_size
    except OSError as exc:
        return Outcome(name, "FAIL", f"cannot size {path}: {exc.strerror or type(exc).__name__}")
    eif_mib = math.ceil(size / MIB)
    needed = EIF_MEMORY_FACTOR * eif_mib
    data = {"eif_mib": eif_mib, "memory_mib": launcher.memory_mib, "cpu_count": launcher.cpu_count}
    problems = []
    if launcher.memory_mib < needed:
        problems.append(
            f"launcher.aws.memory_mib is {launcher.memory_mib}; the {eif_mib} MiB image needs at "
            f"least {EIF_MEMORY_FACTOR} x {eif_mib} = {needed} (plus the model's plaintext)"
        )
    if launcher.cpu_count < 2 or launcher.cpu_count % 2:
        problems.append(
            f"launcher.aws.cpu_count is {launcher.cpu_count}; an enclave takes whole cores: "
            "an even count, at least 2"
        )
    if problems:
        return Outcome(name, "FAIL", "; ".join(problems), data)
    detail = (
        f"{launcher.memory_mib} MiB >= {EIF_MEMORY_FACTOR} x {eif_mib} MiB image, "
        f"{launcher.cpu_count} vCPUs"
    )
    return Outcome(name, "ok", detail, data)


def check_key_policy(kms: Callable[[], Any], deployment: DeploymentConfig) -> Outcome:
    """(3) The key policy, through the same linter as ``nci audit policy``."""
    name = "kms"
    key = deployment.key_id
    try:
        answer = kms().get_key_policy(KeyId=key, PolicyName="default")
        policy = KeyPolicy.from_json(str(answer["Policy"]))
    except ClientError as exc:
        code = _code(exc)
        hint = (
            " (the instance role may read no key policy: run this check with the key "
            "administrator's credentials, or --skip kms)"
            if "AccessDenied" in code
            else ""
        )
        return Outcome(name, "FAIL", f"GetKeyPolicy {key}: {code}{hint}", {"error": code})
    except BotoCoreError as exc:
        code = type(exc).__name__
        return Outcome(name, "FAIL", f"GetKeyPolicy {key}: {code}", {"error": code})
    except KmsPolicyError as exc:
        return Outcome(name, "FAIL", f"the policy of {key} does not parse: {exc}")
    expected = [deployment.expected, *deployment.rollout]
    report = check(policy, expect=expected)
    data = {"policy": report.to_json()}
    if not report.ok:
        errors = [f"{f.id} {f.message}" for f in report.findings if f.severity == "error"]
        return Outcome(name, "FAIL", f"{key}: " + "; ".join(errors), data)
    warnings = [f"{f.id} {f.message}" for f in report.findings if f.severity == "warning"]
    which = "deployment.expected" + (" or deployment.rollout" if deployment.rollout else "")
    detail = f"{key}: kms:Decrypt only with the attestation of {which}"
    return Outcome(name, "ok", detail + "".join(f"; warning {w}" for w in warnings), data)


def check_bundle(name: str, source: BundleSourceConfig, s3: Callable[[], Any]) -> Outcome:
    """(4) The sealed bundle is published: its manifest is there."""
    label = f"bundle {name}"
    if source.folder is not None:
        manifest = source.folder / MANIFEST_NAME
        if manifest.is_file():
            return Outcome(label, "ok", f"{manifest} is there")
        return Outcome(label, "FAIL", f"{manifest} does not exist")
    bucket, key = source.s3_bucket or "", s3_keys(source.s3_prefix)[0]
    where = f"s3://{bucket}/{key}"
    try:
        s3().head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = _code(exc)
        return Outcome(label, "FAIL", f"{where}: HeadObject {code}", {"error": code})
    except BotoCoreError as exc:
        code = type(exc).__name__
        return Outcome(label, "FAIL", f"{where}: HeadObject {code}", {"error": code})
    return Outcome(label, "ok", f"{where} is published")


def _code(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    code = str(error.get("Code") or "error")
    # HEAD answers carry no body: S3 then reports the HTTP status only
    return {"403": "AccessDenied (403)", "404": "NotFound (404)"}.get(code, code)


def _lazy(factory: ClientFactory, service: str) -> Callable[[], Any]:
    made: list[Any] = []

    def get() -> Any:
        if not made:
            made.append(factory(service))
        return made[0]

    return get
