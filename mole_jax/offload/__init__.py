"""Offloaded inference: MoLE lookup-table rows and MoE experts read from storage on demand."""
