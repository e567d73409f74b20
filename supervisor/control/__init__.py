"""The control seam: every verb a caller may use (the table is `ipc.control`), one
implementation (`ControlAPI`) and the policy that decides, per `Principal`, which
verbs and which sessions a caller may touch. The facades, the sub-agent tools and
any RPC call it; nothing else changes sessions or runs on a caller's behalf.
"""
