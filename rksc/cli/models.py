"""`rksc models list|pull|verify`: the registry models on this machine."""

from __future__ import annotations

from rksc.models import pull, registry
from rksc.report import print_models


def run(args) -> int:
    if args.models_command == "list":
        print_models()
        return 0
    if args.models_command == "verify":
        return _verify(args.name)
    registry.recipe(args.name)
    path = pull.prepare(args.name, progress=True, force=args.force)
    print(f"{args.name} ready at {path}")
    if args.keep_gguf:
        print(f"{args.name} source GGUF at {pull.ensure_gguf(args.name)}")
    return 0


def _verify(name: str) -> int:
    state, files = pull.verify(name)
    size = registry.dir_size(registry.model_dir(name))
    note = "" if state.recorded else (" (recorded now: it was prepared by an older rksc, without "
                                      "a file record)")
    print(f"{name}: {files} files match their sha256 ({size / 2**20:.1f} MB){note}")
    return 0
