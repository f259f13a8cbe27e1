"""Issue 38: the amortised posterior's tails on the 1-D linear-Gaussian problem (`ganflow.bench.amortized_tails`).

    python scripts/amortized_tails.py -o tails.json                     # train with every default, then measure
    python scripts/amortized_tails.py --checkpoint amortized.pt -o tails.json   # measure a trained q(z|y)

Writes the record of `tail_record` (20 observations: d2 quantiles of the raw draws, errors raw and as
`ganflow solve --amortized` reports them, within 0.2 sd / 15 %) with the training's steps and time.
"""

from __future__ import annotations

import argparse
import json
import time

from ganflow.bench.amortized_tails import LINE_SIGMA, line_problem, tail_record
from ganflow.posterior.amortized import AmortizedSettings, load_amortized, train_amortized


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--checkpoint", help="measure this q(z|y) (trained on line_problem()) instead of training")
    ap.add_argument("--save", help="where to write the trained checkpoint")
    ap.add_argument("--n-obs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    G, A = line_problem()
    train = {}
    if args.checkpoint:
        post = load_amortized(args.checkpoint)
    else:
        t0 = time.perf_counter()
        res = train_amortized(G, A, LINE_SIGMA, args.save, AmortizedSettings(progress=False), seed=args.seed)
        post = res.posterior
        train = {"train_steps": res.steps, "stopped": res.stopped, "train_wall_s": time.perf_counter() - t0}
    rec = {**train, **tail_record(post, G, A, n_obs=args.n_obs, seed=args.seed + 1)}
    with open(args.output, "w") as f:
        json.dump(rec, f, indent=1)
    print(json.dumps({k: v for k, v in rec.items() if k != "rows"}))


if __name__ == "__main__":
    main()
