"""The summarizer of ``scripts/summarize.py``: training runs -> the ToE paper's tables and "Your runs".

Modules, from the bottom up: ``common`` (names, messages), ``paper_results`` (the paper's tables as rows to
fill), ``runargs`` (a run's arguments and configuration), ``recipes`` (the table scripts' commands and the
comparison with a run's flags), ``runs`` (runs and their measured numbers), ``tables`` (the paper tables),
``yours`` ("Your runs"), ``render`` (text, markdown), ``plots`` (Fig. 3 / 4) and ``cli`` (the command line).
Training code is never imported; ``builders`` and ``toe`` are used to count GFLOPs.
"""
