"""Varied prompts for exactness tests on the default model (chat, summarisation, code, lists, math)."""

ARTICLE = (
    "The city council met on Tuesday to discuss the new bicycle lanes on Main Street. "
    "Supporters said the lanes would make cycling safer and reduce traffic. Shop owners worried "
    "that removing parking spaces would hurt their business. The council voted 5 to 2 to build "
    "the lanes next spring, and promised to add a new parking lot behind the library."
)
CODE = (
    "def average(numbers):\n"
    "    total = 0\n"
    "    for n in numbers:\n"
    "        total += n\n"
    "    return total / len(numbers)\n"
)

PROMPTS = [
    "What is the capital of France?",
    "Tell me a short story about a dragon.",
    "Give me three tips for sleeping better.",
    "How are you today?",
    "Explain what a black hole is in two sentences.",
    f"Summarize the following text in one sentence.\n\n{ARTICLE}",
    f"Summarize this article for a child.\n\n{ARTICLE}",
    f"What did the council decide? Answer using the text.\n\n{ARTICLE}",
    "Write a Python function that returns the factorial of n.",
    f"Rewrite this function so it returns 0 for an empty list:\n\n{CODE}",
    f"Add a docstring to this function:\n\n{CODE}",
    "Write a JavaScript function that reverses a string.",
    "List five fruits.",
    "List the days of the week.",
    "Name four planets of the solar system as a numbered list.",
    "What is 12 times 7?",
    "If I have 3 apples and buy 5 more, how many apples do I have?",
    "Solve for x: 2x + 6 = 10.",
    "Translate 'good morning' into Spanish and French.",
    "Repeat after me: the quick brown fox jumps over the lazy dog.",
    "Write a haiku about autumn.",
    "What is the difference between a list and a tuple in Python?",
]
