"""Memory planning before launch (`python -m rl.plan`): architectures from config files, parameter
counts from meta-device builds, an activation formula for the FLUX transformer, the per-GPU plan,
what to change when it does not fit, and the printed table."""
