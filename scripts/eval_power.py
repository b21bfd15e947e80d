"""How many heated prompts the evaluation needs: power of the exact McNemar test for the
toxicity probability (detoxrl.evaluation.stats.mcnemar_power), by number of prompts.

A prompt is discordant when exactly one model (untrained reference, policy) is toxic on it;
--reference_only and --policy_only are the expected shares of such prompts. The preset's numbers
(docs/results.md): a third of the prompts toxic for the reference, halved by the policy, a tenth
toxic for both.

    python scripts/eval_power.py --reference_only 0.23 --policy_only 0.065 --prompts 48 89
"""

import argparse

from detoxrl.evaluation.stats import mcnemar_power


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference_only", type=float, required=True, help="share of prompts toxic only for the reference")
    parser.add_argument("--policy_only", type=float, required=True, help="share of prompts toxic only for the policy")
    parser.add_argument("--prompts", type=int, nargs="+", default=[24, 48, 89])
    args = parser.parse_args()
    for n in args.prompts:
        print(f"{n} prompts: power {mcnemar_power(n, args.reference_only, args.policy_only):.2f}")


if __name__ == "__main__":
    main()
