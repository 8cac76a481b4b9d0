"""The sweep: a spec read, validated and expanded into typed jobs; the registry of methods; model and data
references; what is known of a model before it runs (its layers, its memory plan).
"""
