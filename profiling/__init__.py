"""Where throughput goes: the training step stage by stage (`step_profile`, `stage_timer`), its
FLOPs and MFU (`flops`), charts, and the conversion, pipeline and loss benches, each measured
beside its baseline (the SLIP reference's PIL pipeline, a plain PIL loop, the oracle loss)."""
