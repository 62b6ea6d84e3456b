"""What a VLM judge is made of: prompt templates, label tokens, image views, model inputs, model
parts, the OpenAI chat wire format, and the tiny Qwen2.5-VL-architecture judge for tests and demos."""
