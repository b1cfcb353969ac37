"""Evaluation: answer normalisation, benchmark metrics and LLaVA-format question/answer files.

Pure Python + numpy; nothing here imports JAX, so scoring runs anywhere, including on
answers files copied off a pod.

  normalize.py        official VQA answer normalisation and LLaVA's EvalAIAnswerProcessor
  vqa.py              VQAv2 / TextVQA soft accuracy, GQA and synthetic exact match
  pope.py             POPE accuracy / precision / recall / F1 / yes-ratio per split
  multiple_choice.py  ScienceQA and MMBench letter extraction and accuracy
  tasks.py            TASKS (prompt suffix, metric, ground-truth fields per benchmark), score()
  questions.py        question / annotation readers (official and LLaVA formats)
  answers.py          resumable answers JSONL (AnswerWriter, read_answers, answered_ids)
"""
