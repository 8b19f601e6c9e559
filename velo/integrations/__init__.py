"""velo inside the orchestrators developers already use (Docker Compose; Tilt lives in plugins/tilt).

These modules sit beside the engine, not inside it: they read a plan and the config and
talk to the other tool's CLI; the engine never imports them.
"""
