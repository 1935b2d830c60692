"""The built-in world: invented people with facts (facts.py), small skills (skills.py), the language
that states them (language.py), the datasets every stage trains on (generate.py: WorldConfig, build,
write), and the gold verifier that scores any answer exactly (verifier.py: Verifier, Score)."""
