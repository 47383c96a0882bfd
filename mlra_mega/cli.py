"""`mlra-mega`: the command line. Errors a user can cause print one line and exit with 2.

Commands grow with the framework; today: `quickstart` (the main job on embedded defaults) and
`config` (load, validate and print a resolved configuration).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlra_mega.errors import MlraMegaError

__all__ = ["main", "build_parser"]

EXIT_USER_ERROR = 2


def _repo_configs() -> Path:
    return Path(__file__).resolve().parent.parent / "configs"


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from mlra_mega.config import load_config, to_dict

    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path and not Path(path).exists():
        path, overrides = None, [path, *overrides]  # `mlra-mega config a.b=1`: no file given
    cfg = load_config(path, overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from mlra_mega.config import ConfigError, load_config
    from mlra_mega.train.smoke import run_smoke

    path = _repo_configs() / "quickstart.yaml"
    if not path.is_file():
        raise ConfigError("quickstart", f"{path} not found",
                          "run from a source checkout (pip install -e .), where configs/ sits beside the package")
    cfg = load_config(path, args.overrides)
    print(f"[quickstart] {cfg.model.num_layers}-layer {cfg.model.attention} GPT, hidden {cfg.model.hidden_size}, "
          f"{cfg.train.steps} steps on synthetic tokens (CPU smoke run until the trainer lands)", flush=True)
    result = run_smoke(cfg, log=lambda line: print(line, flush=True))
    print(f"[quickstart] final loss {result.final_loss:.4f} (first {result.first_loss:.4f}), "
          f"perplexity {result.final_perplexity:.2f}, TEV {result.tev_mean:.5f} +- {result.tev_std:.5f}, "
          f"{result.seconds:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlra-mega", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="load, validate and print a resolved configuration")
    p.add_argument("config", nargs="?", default=None, help="YAML file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("quickstart", help="the main job on embedded defaults (configs/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=_cmd_quickstart)
    return parser


def _quiet_known_warnings() -> None:
    import warnings

    # Optional accelerator libraries (Apex, Transformer Engine) that megatron-core announces
    # missing at import; their absence is expected and changes nothing we use.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")
    warnings.filterwarnings("ignore", message=r"full scope is deprecated")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_known_warnings()
    try:
        return args.func(args)
    except MlraMegaError as exc:
        print(f"mlra-mega: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("mlra-mega: interrupted", file=sys.stderr)
        return 130
