"""Tool calls tracked through multi-turn rollouts: calculator, budget, summary, action mask.

``rp.create_batch_multiturn_rollouts`` runs episodes in which the model may call tools: after
each model turn the tool calls in its text (``<tool name="calculator">{"expression": "6*7"}</tool>``
with the default ``parse_xml_tools``) are executed, their results are appended to the
conversation as ``tool`` messages, and the model speaks again — until it stops calling tools,
the budget runs out or ``max_turns`` is reached. The token ids are kept incrementally:

    completion_ids = model turn 1 ⧺ tool answer 1 ⧺ model turn 2 ⧺ …
    action_mask    = 1 … 1        ⧺ 0 … 0         ⧺ 1 … 1        ⧺ …

so the tool's tokens are context for the model but never trained on.

**Said plainly:** the policy here is a tiny *untrained* model from ``rlprim.testing``; it emits
random text and will essentially never write a well-formed tool call. Part 1 runs it anyway (the
summary shows no tool calls). Part 2 replaces it with a *scripted generator* — a real function
with the ``Generator`` signature ``generator(model, tokenizer, prompts, config) ->
list[Generation]`` that, instead of sampling, writes the reply a tool-using model would write,
and reports the log-probs the policy assigns to those tokens. The multi-turn machinery cannot
tell the difference, so it shows the mechanics end to end: parsing, execution with a budget,
errors, the tracking summary, the action mask in the ``Batch``, and a loss whose gradient is
exactly zero on tool tokens. With a real tool-using model, drop ``generator=`` (the default
``hf_generator`` samples).

Run it:
    python examples/multiturn_tools.py            # 4 conversations x 2 samples for the model
    python examples/multiturn_tools.py --quick    # 3 conversations x 1 sample (the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny local models only: never reach a hub

import torch  # noqa: E402

import rlprim as rp  # noqa: E402
from rlprim.testing import tiny_model, tiny_tokenizer  # noqa: E402

SYSTEM = (
    'You may use a calculator: <tool name="calculator">{"expression": "..."}</tool>. '
    "Give the final answer as <answer>N</answer>."
)
PROBLEMS = [("What is 12*7?", "84"), ("What is (3+4)*5?", "35"), ("What is 6*/7?", "42"),
            ("What is 2**10?", "1024")]


def answer_reward(rollout: rp.Rollout) -> float:
    """1.0 when the last ``<answer>`` of the episode equals the expected answer."""
    answers = [
        match
        for message in rollout.conversation.messages
        if message.role == "assistant"
        for match in re.findall(r"<answer>(.*?)</answer>", message.content)
    ]
    return 1.0 if answers and answers[-1].strip() == rollout.metadata["answer"] else 0.0


def scripted_reply(prompt_text: str) -> str:
    """What a tool-using model would say next, given the conversation so far (as text).

    No tool result yet: call the calculator on the question's expression. Otherwise answer
    with the last tool result. (It reads the tiny chat template's ``<|tool|>`` marker.)
    """
    tool_results = re.findall(r"<\|tool\|>\n(.*?)<\|eos\|>", prompt_text, flags=re.DOTALL)
    if not tool_results:
        expression = re.findall(r"What is (.*?)\?", prompt_text)[-1]
        return f'<tool name="calculator">{json.dumps({"expression": expression})}</tool>'
    result = tool_results[-1].strip()
    return "<answer>unknown</answer>" if result.startswith("error") else f"<answer>{result}</answer>"


def create_scripted_generator(reply_fn):
    """A ``Generator`` that replies ``reply_fn(prompt_text)`` instead of sampling.

    The log-probs it reports are the model's own, ``log softmax(z / T)[y_t]`` of the scripted
    tokens (teacher forcing), so the rollouts are trained on exactly as sampled ones would be.
    Multi-turn rollouts pass prompts as lists of token ids, which must be used verbatim.
    """

    def scripted_generator(model, tokenizer, prompts, config):
        generations = []
        for prompt in prompts:
            if isinstance(prompt, str):
                prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            else:
                prompt_ids = list(prompt)
            reply = reply_fn(tokenizer.decode(prompt_ids))
            reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
            reply_ids.append(tokenizer.eos_token_id)  # the turn ends with EOS, as sampled
            ids = torch.tensor([prompt_ids + reply_ids])
            with torch.no_grad():
                logprobs = rp.get_logprobs(
                    model, ids, torch.ones_like(ids),
                    temperature=config.temperature, completion_length=len(reply_ids),
                )[0]
            for _ in range(config.num_samples):  # the samples of a prompt are consecutive
                generations.append(rp.Generation(
                    text=reply, prompt_ids=tuple(prompt_ids), token_ids=tuple(reply_ids),
                    logprobs=tuple(logprobs.tolist()), finish_reason="stop",
                ))
        return generations

    return scripted_generator


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Tool calls in multi-turn rollouts.")
    parser.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("RLPRIM_EXAMPLE_QUICK") == "1",
        help="a reduced run (also set by RLPRIM_EXAMPLE_QUICK=1)",
    )
    return parser.parse_args()


def print_segments(tokenizer, rollout: rp.Rollout) -> None:
    """The completion cut where the action mask changes: model tokens vs tool tokens."""
    ids, mask = rollout.completion_ids, rollout.action_mask
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or mask[end] != mask[start]:
            who = "model (trains)" if mask[start] else "tool  (masked)"
            print(f"    {who} {end - start:3d} tokens: {tokenizer.decode(ids[start:end])!r}")
            start = end


def main() -> None:
    args = parse_args()
    problems = PROBLEMS[:3] if args.quick else PROBLEMS
    conversations = [
        {"messages": [rp.Message("system", SYSTEM), rp.Message("user", question)],
         "answer": answer}
        for question, answer in problems
    ]
    tokenizer = tiny_tokenizer()
    policy = tiny_model("qwen2", seed=0)
    tools = {"calculator": rp.calculator}

    # --- 1. The untrained tiny model: sampled turns, tools on offer ---------------------------
    sampled = rp.create_batch_multiturn_rollouts(
        policy, tokenizer, conversations,
        rp.GenerationConfig(max_new_tokens=16, num_samples=1 if args.quick else 2, seed=0),
        tools=tools, tool_budget=2, max_turns=3, reward_fn=answer_reward,
    )
    model_summary = rp.track_tool_calls(sampled)
    print("part 1, the untrained model:")
    print(f"  finish reasons: {[r.metadata['finish_reason'] for r in sampled]}")
    print(f"  tool calls: {model_summary['total_calls']} (an untrained model writes no tool calls)")

    # --- 2. A scripted generator, to show the mechanics ------------------------------------
    rollouts = rp.create_batch_multiturn_rollouts(
        policy, tokenizer, conversations,
        rp.GenerationConfig(max_new_tokens=64, num_samples=1, seed=0),
        tools=tools, tool_budget=2, max_turns=3, reward_fn=answer_reward,
        generator=create_scripted_generator(scripted_reply),
    )
    print("part 2, the scripted generator:")
    for rollout in rollouts:
        print(f"  {rollout.conversation.messages[1].content!r}: reward={rollout.rewards} "
              f"turns={rollout.metadata['turns']} finish={rollout.metadata['finish_reason']} "
              f"budget left={rollout.metadata['tool_budget_remaining']}")
        for call in rollout.tool_calls:
            print(f"    {call.name}({call.arguments}) -> result={call.result!r} error={call.error!r}")
    print("  the first episode's completion, cut by the action mask:")
    print_segments(tokenizer, rollouts[0])

    summary = rp.track_tool_calls(rollouts)
    print("  track_tool_calls:", {k: summary[k] for k in (
        "total_calls", "executed_calls", "error_calls", "error_rate", "calls_per_tool")})

    # --- 3. The action mask in training: tool tokens get exactly zero gradient --------------
    batch = rp.rollouts_to_batch(rollouts, tokenizer)
    assert batch.completion_mask.sum() == sum(sum(r.action_mask) for r in rollouts)
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    new_logprobs = rp.get_logprobs(
        policy, input_ids, batch.attention_mask, completion_length=batch.completion_ids.shape[1]
    )  # [B, Tc]
    new_logprobs.retain_grad()
    advantages = batch.rewards - batch.rewards.mean()  # [B]: a batch-mean baseline
    loss, _ = rp.compute_reinforce_loss(new_logprobs, advantages, batch.completion_mask)
    loss.backward()
    real = batch.attention_mask[:, batch.prompt_ids.shape[1]:].bool()  # not padding
    tool_tokens = real & (batch.completion_mask == 0)
    assert torch.all(new_logprobs.grad[tool_tokens] == 0)
    assert torch.any(new_logprobs.grad[batch.completion_mask == 1] != 0)
    print(f"  batch: {int(batch.completion_mask.sum())} model tokens train, "
          f"{int(tool_tokens.sum())} tool tokens are masked (their gradient is exactly 0)")

    correct = sum(r.rewards == 1.0 for r in rollouts)
    print(
        f"[multiturn_tools] done: model_tool_calls={model_summary['total_calls']} "
        f"scripted_calls={summary['total_calls']} executed={summary['executed_calls']} "
        f"errors={summary['error_calls']} masked_tool_tokens={int(tool_tokens.sum())} "
        f"correct={correct}/{len(rollouts)}"
    )


if __name__ == "__main__":
    main()
