"""Phase 3: the teachers that label plans (OpenAI, Gemini, OpenAI-compatible, rule-based reference)."""
