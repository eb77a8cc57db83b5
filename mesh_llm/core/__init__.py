"""core layer of mesh-llm (see DESIGN.md section 11)."""
