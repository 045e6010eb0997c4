"""`python -m effllm.apps.selp [--model M] [--samples N]`: the SELP demo (effllm.apps.selp.demo) as a table.
`--write-data FILE` writes the fine-tuning text instead (instruction -> formula and plan pairs)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from effllm.apps.selp.demo import TASKS, run_task, training_text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded default model)")
    p.add_argument("--samples", type=int, default=10, help="formulas sampled per instruction")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--json", action="store_true")
    p.add_argument("--write-data", default=None, metavar="FILE", help="write the fine-tuning text and stop")
    args = p.parse_args()
    if args.write_data:
        Path(args.write_data).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write_data).write_text(training_text())
        print(f"wrote {args.write_data}")
        return
    from effllm.engine import LLM
    from effllm.models.default import model_or_default

    llm = LLM(str(model_or_default(args.model)))
    results = [run_task(llm, i, f, args.samples, args.temperature) for i, f in TASKS]
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
        return
    print(
        "| instruction | votes | voted formula | = reference | SELP plan | satisfies | trie-only plan | satisfies |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.instruction} | {r.votes} (+{r.invalid} invalid) | `{r.formula}` | {r.formula_correct} | "
            f"{' '.join(r.plan)} | {r.plan_ok} | {' '.join(r.baseline_plan)} | {r.baseline_ok} |"
        )
    n = len(results)
    sampled = sum(r.samples_correct for r in results)
    print(f"\nsampled formulas equivalent to the reference: {sampled}/{n * args.samples}", end="")
    print(
        f"; voted formulas: {sum(r.formula_correct for r in results)}/{n}; plans satisfying "
        f"the reference: SELP {sum(r.plan_ok for r in results)}/{n}, trie only {sum(r.baseline_ok for r in results)}/{n}"
    )


if __name__ == "__main__":
    main()
