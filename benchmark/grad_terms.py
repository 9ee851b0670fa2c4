"""What drives a CMDP update: the gradient norm of each loss term on one batch, before and after the paper's reward.

Samples one batch of prompts_per_step x group_size responses from a student (seeded), scores it against the teacher,
and computes on the same batch the gradient of the policy-gradient term (I) and of the KL term (II) under three
definitions of cmdp_distill.py, (I) = -1/N sum_{i,t} A_i log pi (N the batch's response tokens) in each:
  commit 63882d6:      R~ = -1 for violators, and (II) = 1 / (number of violators) sum_viol KLbar
  commit 3902674:      R~ = -(n + phi(y)) for violators, n = 20, and (II) = 1/B sum_viol phi(y), B the responses
  now (the derivative): R~ = -(n + phi(y)), and (II) = 1/N sum_viol phi(y), as (I): the derivative of J_n x B/N
It prints each term's gradient norm and the cosine of the total update with each term (a cosine near 1 means that
term alone decides the update's direction).

    python benchmark/grad_terms.py                                   # the toy pair, 3 batches (seeds 1 2 3)
    python benchmark/grad_terms.py --student S --teacher T --dataset D --seeds 1 2 3
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cmdp_distill as cmdp  # noqa: E402
import common  # noqa: E402
import toy_math  # noqa: E402


@dataclass
class Args:
    student: str = "toy"
    teacher: str = "toy"
    dataset: str = "toy"
    seeds: tuple[int, ...] = (1, 2, 3)
    """one batch per seed"""
    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 64
    budget: float = 0.05


def main(args: Args) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = torch.device("cpu")
    student_path, teacher_path = toy_math.resolve(args.student, "student"), toy_math.resolve(args.teacher, "teacher")
    problems_all = common.load_problems(toy_math.resolve(args.dataset, "train"), "train")
    tokenizer = common.load_tokenizer(student_path)
    student = common.load_model(student_path, device, torch.float32)
    teacher = common.load_model(teacher_path, device, torch.float32).eval().requires_grad_(False)
    common.disable_dropout(student)
    vocab = common.vocab_size(tokenizer, student, teacher)
    params = [p for p in student.parameters() if p.requires_grad]
    print("| batch | definition | violating | pg_grad_norm (I) | kl_grad_norm (II) | cos(total, I) | cos(total, II) |")
    print("|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        indices = cmdp.batch_indices(0, args.prompts_per_step, len(problems_all), seed)
        problems = [problems_all[i] for i in indices for _ in range(args.group_size)]
        prompts = [common.render_prompt(tokenizer, p["question"]) for p in problems]
        torch.manual_seed(seed)
        pairs = common.generate(student, tokenizer, prompts, args.max_new_tokens, 1.0, len(prompts))
        rewards = torch.tensor(
            [
                float(common.is_correct(tokenizer.decode(r, skip_special_tokens=True), p["answer"]))
                for (_, r), p in zip(pairs, problems)
            ]
        )
        batch = common.pad_sequences(pairs, tokenizer.pad_token_id, device)
        mask = batch["response_mask"]
        num_tokens, batch_size = int(mask.sum()), len(pairs)
        with torch.no_grad():
            teacher_hidden = common.final_hidden(teacher, batch)
        for name in ("63882d6", "3902674, (II) / B", "now, (II) / N"):  # one forward and backward each
            kl, logprobs = common.score(
                student, batch, teacher_hidden, teacher.get_output_embeddings().weight, 1024, vocab
            )
            phi = common.sequence_costs(kl, mask, "mean")  # (B,) differentiable
            violated = phi.detach() > args.budget
            if name == "63882d6":
                shaped = torch.where(violated, torch.full_like(rewards, -1.0), rewards)
                kl_term = (phi * violated).sum() / max(int(violated.sum()), 1)
            else:  # explicit_cost_loss divides by its third argument
                shaped = cmdp.modified_rewards(rewards, phi.detach(), args.budget, 20.0)
                kl_term = cmdp.explicit_cost_loss(phi, violated, batch_size if "/ B" in name else num_tokens, 1.0)
            advantages = cmdp.group_advantages(shaped, args.group_size, False)
            pg_loss, _ = cmdp.policy_loss(logprobs, logprobs.detach(), advantages, mask, 0.2, num_tokens)
            student.zero_grad(set_to_none=True)
            out = common.backward_with_diagnostics({"pg": pg_loss, "kl": kl_term}, params)
            print(
                f"| seed {seed} | {name} | {violated.float().mean():.2f} | "
                f"{out['losses/pg_grad_norm']:.4f} | {out['losses/kl_grad_norm']:.4f} | "
                f"{out['losses/cos_total_pg']:.3f} | {out['losses/cos_total_kl']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main(tyro.cli(Args))
