"""What a user may take: disk (a quota, the service's reserve) and money (usage, budgets).

* :mod:`.disk_quota`: each user's quota on what their agents keep.
* :mod:`.disk_reserve`: the room kept for the service's own state (a ballast file).
* :mod:`.usage`: what each user and run spent, counted by the model proxy; daily budgets.
"""
