"""Container entrypoint: ``python -m jobs.launch COMMAND [ARGS...]``.

Loads S3 credentials from a Kubernetes Secret into the environment, then replaces itself with
``COMMAND`` (``os.execvpe``: same PID, signals and exit code go straight to the command).

Why: TorchX's kubernetes scheduler (0.7) only sets literal ``env`` values on its pods; it cannot
reference a Secret (no ``valueFrom``/``envFrom``, no secret volumes). So the components pass the
Secret's *name* in ``QUANTCORE_S3_SECRET`` and this launcher reads it through the Kubernetes API
with the pod's service account.

Rules, in order:

1. ``QUANTCORE_S3_SECRET`` unset or empty: run the command unchanged.
2. ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` both set already (e.g. ``secretKeyRef``
   env vars, a local shell): log that the Secret is not needed and run the command unchanged.
3. Not in a cluster (no service-account namespace file under
   ``/var/run/secrets/kubernetes.io/serviceaccount``): log that it skips and run the command
   unchanged (boto3's own credential chain applies: profile, IRSA, instance role ...).
4. Otherwise read Secret ``<namespace>/<QUANTCORE_S3_SECRET>`` (namespace: the service account's,
   or ``QUANTCORE_S3_SECRET_NAMESPACE``). It must hold ``AWS_ACCESS_KEY_ID`` and
   ``AWS_SECRET_ACCESS_KEY``. ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``
   come from the Secret as a set (a stale session token in the environment is dropped); any other
   key that is a valid variable name (e.g. ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``) is
   exported only when the environment does not set it already. Values are never logged.

The service account needs ``get`` on that one Secret (a Role rule with ``resources: [secrets]``,
``resourceNames: [<secret>]``, ``verbs: [get]``) and the pod must mount its token.

Exit codes: the command's own; 2 when the Secret cannot be used (missing, forbidden, incomplete:
retrying cannot help); 1 when the API server could not be reached after a few attempts; 127 when
the command is not found.
"""
from __future__ import annotations

import base64
import functools
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Mapping, MutableMapping, Optional, Sequence

from quantcore.errors import QuantcoreError, UserError

SECRET_ENV = "QUANTCORE_S3_SECRET"
NAMESPACE_ENV = "QUANTCORE_S3_SECRET_NAMESPACE"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
SESSION_KEY = "AWS_SESSION_TOKEN"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# (namespace, name) -> the Secret's decoded data
SecretReader = Callable[[str, str], Mapping[str, str]]


class LaunchError(QuantcoreError, RuntimeError):
    """The Secret could not be read; ``exit_code`` says whether retrying may help (1) or not (2)."""

    exit_code = 1

    def __init__(self, message: str, exit_code: Optional[int] = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class SecretError(LaunchError, UserError):
    """The Secret cannot be used as configured (missing, forbidden, incomplete): a user mistake,
    retrying cannot help (exit 2)."""

    exit_code = 2


def log(msg: str) -> None:
    print(f"jobs.launch: {msg}", file=sys.stderr, flush=True)


def read_secret_incluster(namespace: str, name: str, sa_dir: str = SA_DIR,
                          environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Read a Secret with the pod's service account: the kubernetes client's in-cluster config
    (``KUBERNETES_SERVICE_HOST``/``_PORT``, ``<sa_dir>/token`` and ``<sa_dir>/ca.crt``)."""
    from kubernetes import client
    from kubernetes.config.config_exception import ConfigException
    from kubernetes.config.incluster_config import InClusterConfigLoader

    cfg = client.Configuration()
    try:
        InClusterConfigLoader(token_filename=os.path.join(sa_dir, "token"),
                              cert_filename=os.path.join(sa_dir, "ca.crt"),
                              environ=os.environ if environ is None else environ).load_and_set(cfg)
    except ConfigException as err:
        raise SecretError(f"cannot use the in-cluster Kubernetes config to read Secret {namespace}/{name}: "
                          f"{err}") from None
    with client.ApiClient(cfg) as api:
        secret = client.CoreV1Api(api).read_namespaced_secret(name, namespace, _request_timeout=30)
    return {k: base64.b64decode(v).decode("utf-8") for k, v in (secret.data or {}).items()}


def _status(err: BaseException) -> Optional[int]:
    status = getattr(err, "status", None)
    return status if isinstance(status, int) else None


def _read(reader: SecretReader, namespace: str, name: str, attempts: int,
          sleep: Callable[[float], None]) -> Mapping[str, str]:
    where = f"Secret {namespace}/{name}"
    for attempt in range(1, attempts + 1):
        try:
            return reader(namespace, name)
        except LaunchError:
            raise
        except Exception as err:  # noqa: BLE001 - classified below, re-raised as LaunchError
            status = _status(err)
            if status == 403:
                raise SecretError(
                    f"{where}: forbidden (403). The pod's service account needs `get` on it: a Role rule "
                    f"apiGroups: [\"\"], resources: [secrets], resourceNames: [{name}], verbs: [get], "
                    f"bound to that service account") from None
            if status == 404:
                raise SecretError(f"{where} not found (404): create it with AWS_ACCESS_KEY_ID and "
                                  f"AWS_SECRET_ACCESS_KEY, or fix {SECRET_ENV}") from None
            if status == 401:
                raise SecretError(f"{where}: unauthorized (401): the service-account token is missing "
                                  f"or invalid (automountServiceAccountToken: false?)") from None
            if status is not None and 400 <= status < 500:
                raise SecretError(f"{where}: HTTP {status}: {getattr(err, 'reason', err)}") from None
            if attempt == attempts:
                raise LaunchError(f"{where}: could not read it after {attempts} attempts: "
                                  f"{type(err).__name__}: {err}", exit_code=1) from None
            delay = min(2.0 ** attempt, 10.0)
            log(f"reading {where} failed ({type(err).__name__}: {err}); retrying in {delay:.0f} s")
            sleep(delay)
    raise AssertionError("unreachable")


def resolve_env(environ: Mapping[str, str], reader: Optional[SecretReader] = None, sa_dir: str = SA_DIR,
                attempts: int = 4, sleep: Callable[[float], None] = time.sleep) -> Dict[str, str]:
    """The environment to run the command with: a new dict, ``environ`` itself is not changed."""
    env = dict(environ)
    name = env.get(SECRET_ENV, "").strip()
    if not name:
        return env
    if all(env.get(k) for k in CREDENTIAL_KEYS):
        log(f"{SECRET_ENV}={name}: AWS credentials are already in the environment; not reading the Secret")
        return env
    ns_file = Path(sa_dir) / "namespace"
    if not ns_file.is_file():
        log(f"{SECRET_ENV}={name}: not running in a Kubernetes pod ({ns_file} missing); skipping the "
            f"Secret, boto3's default credential chain applies")
        return env
    namespace = env.get(NAMESPACE_ENV, "").strip() or ns_file.read_text().strip()
    if reader is None:
        reader = functools.partial(read_secret_incluster, sa_dir=sa_dir, environ=env)
    data = _read(reader, namespace, name, attempts, sleep)
    missing = [k for k in CREDENTIAL_KEYS if not data.get(k)]
    if missing:
        raise SecretError(f"Secret {namespace}/{name} has no {', '.join(missing)} "
                          f"(its keys: {', '.join(sorted(data)) or 'none'})")
    exported, kept = [], []
    for key, value in data.items():
        if not _ENV_NAME.match(key):
            log(f"Secret {namespace}/{name}: key {key!r} is not a valid environment variable name; ignored")
        elif key in CREDENTIAL_KEYS or key == SESSION_KEY or not env.get(key):
            env[key] = value
            exported.append(key)
        else:
            kept.append(key)
    if SESSION_KEY not in data and env.pop(SESSION_KEY, None) is not None:
        log(f"dropped {SESSION_KEY} from the environment: it does not belong to the Secret's keys")
    log(f"exported {', '.join(sorted(exported))} from Secret {namespace}/{name}"
        + (f" (kept the environment's {', '.join(sorted(kept))})" if kept else ""))
    return env


def main(argv: Optional[Sequence[str]] = None, reader: Optional[SecretReader] = None,
         environ: Optional[MutableMapping[str, str]] = None, sa_dir: str = SA_DIR,
         execvpe: Callable[..., object] = os.execvpe) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] if not args else __doc__, file=sys.stderr)
        return 2 if not args else 0
    try:
        env = resolve_env(os.environ if environ is None else environ, reader, sa_dir)
    except LaunchError as err:
        log(f"error: {err}")
        return err.exit_code
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        execvpe(args[0], args, env)
    except FileNotFoundError:
        log(f"error: command not found: {args[0]}")
        return 127
    except PermissionError as err:
        log(f"error: cannot execute {args[0]}: {err}")
        return 126
    return 0  # only reached with a test double for execvpe


if __name__ == "__main__":
    sys.exit(main())
