"""The judge backends (each implements reward.judge.Judge: scores in [0, 1] or a JudgeError): the
rule judge of the synthetic world and its identity content terms, a VLM in-process, a VLM over the
OpenAI API."""
