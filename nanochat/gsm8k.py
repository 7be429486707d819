"""GSM8K (grade-school math word problems): answer extraction and reward.

Shared by chat_eval's GSM8K task (nanochat/chat_tasks.py: accuracy on the test split) and scripts/chat_rl.py
(the reward). A question is a conversation {"messages": [user question, assistant solution]} as
nanochat/chat_data.py converts hub rows (calculator annotations <<...>> removed); the solution ends with
"#### <answer>".
- reference: the number after "####";
- prediction: the last number of the model's reply, thousands separators removed;
- both normalised (`normalize_number`), so "18", "18.0", "18.00" and "$18" match; reward 1 on a match, else 0.
The chat format has no tool or python tokens (nanochat/tokenizer.py SPECIAL_TOKENS), so there is no
calculator tool: the model does the arithmetic in its own tokens.
"""

import re
from decimal import Decimal, InvalidOperation

# a number: optional minus (not inside a word or a range like 3-5), digits with optional thousands separators,
# optional decimals; a currency sign before it is not part of the match
NUMBER = re.compile(r"(?:(?<![\w-])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def normalize_number(text: str) -> str | None:
    """Canonical text of a number: '1,000' -> '1000', '18.0' -> '18', '2.50' -> '2.5', '$18' -> '18'; None if not one."""
    try:
        value = Decimal(text.strip().lstrip("$").replace(",", ""))
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(reply: str) -> str | None:
    """The model's answer: the last number in its reply, normalised; None when it wrote no number."""
    numbers = NUMBER.findall(reply)
    return normalize_number(numbers[-1]) if numbers else None


def reference_answer(solution: str) -> str:
    """The normalised number after '####' in a GSM8K solution."""
    _, marker, answer = solution.rpartition("####")
    numbers = NUMBER.findall(answer)
    if not marker or not numbers:
        raise ValueError(f"a GSM8K solution must end with '#### <number>', got {solution[-60:]!r}")
    return normalize_number(numbers[0])


def reward(reply: str, answer: str) -> float:
    """1.0 when the reply's last number equals the (normalised) reference answer, else 0.0."""
    return float(extract_answer(reply) == answer)


def answer_of(conversation: dict) -> str:
    """The reference answer of a GSM8K conversation."""
    return reference_answer(conversation["messages"][1]["content"])
