"""`python -m gisp.plan [gisp.run overrides] [device_memory_gb=80]`: print a run's memory plan (gisp.memory) and check
it against the given memory per device (or the visible GPUs); loads and writes nothing. Thin: Hydra's compose in,
`plan_for_run(settings)` out."""

from __future__ import annotations

import sys

from gisp.cli import compose_config, user_errors
from gisp.config import load_settings
from gisp.errors import GispError
from gisp.memory.scoring import GiB, check_fits, plan_for_run, visible_device_memory


def split_memory_arg(args: list[str]) -> tuple[list[str], float | None]:
    """`device_memory_gb=80` (GB per device, the check's budget) is the plan's own argument, not a config key."""
    rest, gb = [], None
    for a in args:
        key, _, value = a.lstrip("+").partition("=")
        if key == "device_memory_gb":
            try:
                gb = float(value)
            except ValueError:
                raise GispError(f"device_memory_gb={value!r} is not a number of GB, e.g. device_memory_gb=80") from None
        else:
            rest.append(a)
    return rest, gb


@user_errors(stop_message=lambda sig: f"stopped by {sig}: a plan loads and writes nothing", resumable=False)
def plan(args: list[str]) -> None:
    overrides, gb = split_memory_arg(args)
    # gisp.run's config; evaluation plays no part in the plan (and trainer=fsdp refuses some of it in gisp.run)
    settings = load_settings(compose_config("config", [*overrides, "eval=none"]), here=False)
    memory_plan = plan_for_run(settings)
    if memory_plan is None:
        raise GispError(f"no memory plan for model {settings.model.name} with pruner {settings.pruner.name} "
                        "(only gradient passes are planned; see the warning above)")
    print(memory_plan.table())
    memory = int(gb * 1e9) if gb is not None else visible_device_memory(settings.trainer)
    check_fits(memory_plan, memory)
    if memory is not None:
        print(f"fits: {memory_plan.total / GiB:.1f} GiB of {memory / GiB:.1f} GiB per device")


def main(argv: list[str] | None = None) -> None:
    plan(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
