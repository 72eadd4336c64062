"""`--only NAME`: run one check of a report alone, and the command line that does it.

Every check draws its random inputs from the run's seed and its own name (op: seed ^ crc32(op/case); block and
model: seed ^ crc32 of the block or "model"), so the same backend, mode, case set and seed give the same inputs
whether a check runs inside the whole suite or alone."""

from __future__ import annotations

import shlex

from conformance import block_checks, dist_checks, model_checks, op_checks
from conformance.context import CheckResult, Suite
from core.backend import DTYPE_NAMES
from core.errors import UserError
from core.ops import OPERATORS
from core.safe_files import quote_name

NAME_FORMS = "op/OPERATOR/CASE/DTYPE, block/BLOCK/CASES/DTYPE, model/CHECK/DTYPE or dist/CHECK/N-ranks"
LEVELS = ("op", "block", "model", "dist")


def level_of(name: str) -> str:
    """The level a check name belongs to; a one-line UserError for a name no run can produce."""
    parts = name.split("/")
    if len(parts) < 2 or parts[0] not in LEVELS or not all(parts):
        raise UserError(f"--only: {quote_name(name)} is not a check name ({NAME_FORMS}; copy one from a report)")
    if parts[0] == "op" and parts[1] not in OPERATORS:
        raise UserError(f"--only: {quote_name(parts[1])} in {quote_name(name)} is not an operator of the contract "
                        f"({', '.join(OPERATORS)})")
    if parts[0] == "dist" and not _ranks(name):
        raise UserError(f"--only: {quote_name(name)} does not end in N-ranks (dist/CHECK/N-ranks)")
    return parts[0]


def _ranks(name: str) -> int | None:
    tail = name.rsplit("/", 1)[-1]
    count = tail[:-len("-ranks")] if tail.endswith("-ranks") else ""
    return int(count) if count.isdigit() and int(count) >= 2 else None


def _fast_op(suite: Suite, name: str) -> CheckResult | None:
    """The op check `name` run directly (op/OPERATOR/CASE/DTYPE), or None when the name is not of that form."""
    parts = name.split("/")
    if len(parts) != 4 or parts[1] not in suite.backend.ops or parts[3] not in DTYPE_NAMES:
        return None
    case = next((c for c in op_checks.load_cases().get(parts[1], []) if c["name"] == parts[2]
                 and suite.case_set in c["sets"]), None)
    if case is None:
        return None
    result = op_checks.check_case(suite, parts[1], case, DTYPE_NAMES[parts[3]])
    return result if result.name == name else None


def _fast_block(suite: Suite, name: str) -> CheckResult | None:
    """The block check `name` run directly (block/BLOCK/CASES/DTYPE), or None when the name is not of that form."""
    parts = name.split("/")
    if len(parts) != 4 or parts[1] not in block_checks.CHECKS or parts[2] != suite.case_set:
        return None
    needs = block_checks.NEEDS.get(parts[1], [])
    dtype = DTYPE_NAMES.get(parts[3])
    if any(op not in suite.backend.ops for op in needs) or dtype not in suite.working_dtypes(needs):
        return None
    result = block_checks.CHECKS[parts[1]](suite, dtype)
    return result if result.name == name else None


def run(suite: Suite, name: str, bisect: bool = True) -> list[CheckResult]:
    """The result of the check `name` alone (a level's other checks of the same operator may run, only this one is
    returned). A one-line UserError when this backend and case set have no such check."""
    level = level_of(name)
    if level == "op":
        fast = _fast_op(suite, name)
        results = [fast] if fast is not None else op_checks.run(suite, [name.split("/")[1]])
    elif level == "block":
        fast = _fast_block(suite, name)
        results = [fast] if fast is not None else block_checks.run(suite)
    elif level == "model":
        results = model_checks.run(suite, bisect)
    else:
        results = dist_checks.run(suite, [_ranks(name)])
    found = [r for r in results if r.name == name]
    if not found:
        near = sorted(r.name for r in results)[:6]
        raise UserError(f"--only: no check named {quote_name(name)} for backend {suite.backend.name} with cases "
                        f"'{suite.case_set}'" + (f"; this level has e.g. {', '.join(near)}" if near else ""))
    return found


def reproduce_command(environment: dict, name: str) -> str:
    """The command that runs the check `name` of a report alone, with the report's backend, mode, case set and seed."""
    args = ["python", "-m", "conformance", "--backend", str(environment["backend"])]
    if environment.get("triton_interpreter"):
        args.append("--interpret")
    if environment.get("simulation"):
        args.append("--simulate")
    args += ["--cases", str(environment["case_set"]), "--seed", str(environment["seed"]), "--only", name]
    return " ".join(shlex.quote(a) for a in args)
