"""`python -m effllm.apps.selp [--model M] [--samples N]`: the SELP demo (effllm.apps.selp.demo) as a table."""

from __future__ import annotations

import argparse
import json

from effllm.apps.selp.demo import TASKS, run_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded default model)")
    p.add_argument("--samples", type=int, default=10, help="formulas sampled per instruction")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
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
    print(
        f"\nformulas equivalent to the reference: {sum(r.formula_correct for r in results)}/{n}; plans satisfying "
        f"the reference: SELP {sum(r.plan_ok for r in results)}/{n}, trie only {sum(r.baseline_ok for r in results)}/{n}"
    )


if __name__ == "__main__":
    main()
