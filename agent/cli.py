"""``edge-agent``: run the agent on a device, talk to a running one, or try it all with ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent import __version__
from agent.clitools import EXIT_FAILED, EXIT_USAGE, not_built_yet

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-agent",
        description="Runs signed, quantized models on this device and serves them to local apps over a Unix socket.",
    )
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="start the agent (what the systemd service runs)")
    run.add_argument("--config", required=True, type=Path, help="agent config file (TOML)")

    chk = sub.add_parser("check-config", help="validate a config file and its models' schemas, then exit")
    chk.add_argument("--config", required=True, type=Path)

    sock_help = "the agent's API socket (default: /run/edge-agent/api.sock)"
    inf = sub.add_parser("infer", help="run one inference through a running agent")
    inf.add_argument("model", help="model name, e.g. cancer-mlp")
    inf.add_argument("--socket", type=Path, default=Path("/run/edge-agent/api.sock"), help=sock_help)
    src = inf.add_mutually_exclusive_group(required=True)
    src.add_argument("--json", dest="inputs_json", help='inputs as JSON, e.g. \'{"features": [[1.0, 2.0]]}\'')
    src.add_argument("--file", type=Path, help="a JSON file with the inputs (or {\"inputs\": ...})")

    mod = sub.add_parser("models", help="list the models a running agent serves")
    mod.add_argument("--socket", type=Path, default=Path("/run/edge-agent/api.sock"), help=sock_help)

    sub.add_parser("profiles", help="list the built-in firmware profiles")

    demo = sub.add_parser("demo", help="start an agent on the bundled demo models and run a client against it")
    demo.add_argument("--keep", action="store_true", help="keep the demo's temporary directory")

    ins = sub.add_parser("install", help="sideload a signed model bundle (the checks of an OTA order, minus the order)")
    ins.add_argument("path", type=Path, help="the bundle file")
    ins.add_argument("--socket", type=Path, default=Path("/run/edge-agent/api.sock"), help=sock_help)
    ins.add_argument("--config", type=Path,
                     help="agent config: install offline into its state directory when the agent is not running")
    rot = sub.add_parser("rotate-root", help="apply the next trust-root version (signed by old and new root keys)")
    rot.add_argument("path", type=Path, help="the new root.json")
    rot.add_argument("--socket", type=Path, default=Path("/run/edge-agent/api.sock"), help=sock_help)
    sub.add_parser("provision", help="claim this device's identity with the fleet (not built yet)")
    return p


def _read_inputs(args: argparse.Namespace) -> dict[str, Any]:
    try:
        doc = json.loads(args.file.read_text() if args.file else args.inputs_json)
    except OSError as exc:
        raise SystemExit(f"edge-agent infer: cannot read {args.file}: {exc.strerror}") from None
    except ValueError as exc:
        raise SystemExit(f"edge-agent infer: the inputs are not valid JSON: {exc}") from None
    if isinstance(doc, dict) and isinstance(doc.get("inputs"), dict):
        doc = doc["inputs"]
    if not isinstance(doc, dict):
        raise SystemExit('edge-agent infer: inputs must be a JSON object: {"<input name>": [[...]]}')
    return doc


def _print_outcome(doc: dict[str, Any]) -> int:
    ok = doc.get("status") in ("soaking", "healthy", "already_installed")
    what = f"{doc.get('model')}@{doc.get('version')}" if doc.get("model") else "bundle"
    line = f"{what}: {doc.get('status')}"
    if doc.get("reason"):
        line += f" ({doc['reason']})"
    if doc.get("message"):
        line += f": {doc['message']}"
    print(line, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else EXIT_FAILED


def _install(args: argparse.Namespace) -> int:
    """Through the running agent (hot swap, live soak); offline into the state directory if it is not running."""
    from agent.localapi import LocalApiError, LocalClient

    path = args.path.resolve()
    if not path.is_file():
        print(f"edge-agent install: {path} is not a file", file=sys.stderr)
        return EXIT_USAGE
    try:
        with LocalClient(args.socket, timeout=600) as client:
            return _print_outcome(client.request("POST", "/v1/admin/install", {"path": str(path)}))
    except LocalApiError as exc:
        if exc.code != "unreachable" or args.config is None:
            hint = "" if args.config else " (pass --config to install offline while the agent is stopped)"
            print(f"edge-agent install: {exc}{hint}", file=sys.stderr)
            return EXIT_FAILED
    from agent.config import ConfigError, load_config
    from agent.logs import configure_logging
    from agent.service import Agent

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"edge-agent: invalid config: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging("warning", "text")
    agent = Agent.from_config(config)
    if agent.updater is None or config.updates.trust_root is None:
        print("edge-agent install: bundle installs are disabled: set updates.trust_root in the config",
              file=sys.stderr)
        return EXIT_USAGE
    agent.updater.trust.provision(config.updates.trust_root)
    agent.updater.recover()
    agent.updater.load_installed()
    outcome = agent.updater.install_file(path)
    agent.host.close()
    message = outcome.message + ("; the live soak runs when the agent starts" if outcome.status == "soaking" else "")
    return _print_outcome({"status": outcome.status, "model": outcome.model, "version": outcome.version,
                           "reason": outcome.reason, "message": message})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return EXIT_USAGE
    if args.command == "install":
        return _install(args)
    if args.command == "rotate-root":
        from agent.localapi import LocalApiError, LocalClient

        try:
            with LocalClient(args.socket) as client:
                doc = client.request("POST", "/v1/admin/trust-root", {"path": str(args.path.resolve())})
        except LocalApiError as exc:
            print(f"edge-agent rotate-root: {exc}", file=sys.stderr)
            return EXIT_FAILED
        if doc.get("status") != "rotated":
            print(f"edge-agent rotate-root: refused ({doc.get('reason')}): {doc.get('message')}", file=sys.stderr)
            return EXIT_FAILED
        print(f"trust root rotated to version {doc['version']}")
        return 0
    if args.command == "provision":
        return not_built_yet("edge-agent", "provision", "MQTT provisioning")
    if args.command == "profiles":
        from agent.profiles import builtin_profiles_dir, load_profiles

        for name, prof in sorted(load_profiles(builtin_profiles_dir()).items()):
            print(f"{name:20} {prof.architecture:8} {prof.cores} cores  {prof.memory_mb:6} MB  "
                  f"runtimes: {', '.join(prof.runtime_order)}")
        return 0
    if args.command in ("infer", "models"):
        from agent.localapi import LocalApiError, LocalClient

        try:
            with LocalClient(args.socket) as client:
                if args.command == "models":
                    print(json.dumps(client.models(), indent=2))
                else:
                    print(json.dumps(client.infer(args.model, _read_inputs(args)), indent=2))
        except LocalApiError as exc:
            print(f"edge-agent {args.command}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        return 0
    if args.command == "demo":
        from agent.demo import run_demo

        return run_demo(keep=args.keep)
    return _run_or_check(args)


def _run_or_check(args: argparse.Namespace) -> int:
    from agent.config import ConfigError, load_config
    from agent.logs import configure_logging
    from agent.profiles import ProfileError
    from agent.runtime import ModelLoadError, load_schema_file

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"edge-agent: invalid config: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check-config":
        from agent.bundle import BundleError, TrustRoot
        from agent.profiles import builtin_profiles_dir, resolve_profile

        try:
            resolve_profile(config.profile, config.profiles_dir or builtin_profiles_dir())
            for m in config.models:
                load_schema_file(m.schema)
            if config.updates.trust_root is not None:
                try:
                    TrustRoot.from_bytes(config.updates.trust_root.read_bytes())
                except (BundleError, OSError) as exc:
                    raise ModelLoadError(f"updates.trust_root {config.updates.trust_root}: {exc}") from None
        except (ProfileError, ModelLoadError) as exc:
            print(f"edge-agent: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"{args.config}: OK (device {config.device_id}, profile {config.profile}, "
              f"{len(config.models)} model(s))")
        return 0

    configure_logging(config.log_level, config.log_format)
    import logging

    from agent.service import Agent

    log = logging.getLogger("edge_agent")
    try:
        agent = Agent.from_config(config)
    except ProfileError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_USAGE
    from agent.bundle import BundleError
    from agent.updater.state import StateCorruptError

    try:
        return agent.run()
    except (ModelLoadError, OSError, BundleError, StateCorruptError) as exc:
        # A bad model, an unreadable file, or a trust root that is not a valid self-signed root: say which.
        log.error("cannot start: %s", exc, extra={"reason": str(exc)})
        agent.stop()
        return EXIT_FAILED
