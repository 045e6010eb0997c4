"""`effllm bench sparse-matmul`: every shape, sparsity and row count timed, and a crossover per row count."""

from effllm.bench.sparse_matmul import run


def test_bench_reports_speedups_and_a_crossover_per_row_count():
    data = run(["32x48"], ["0.5", "0.95"], [1, 8], iters=1, reps=1)
    assert len(data["results"]) == 4 and set(data["crossover"]) == {"1", "8"}
    assert all(r["speedup"] > 0 for r in data["results"])
