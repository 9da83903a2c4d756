"""The bundled demo: a cohort of slides with drawn pen ink from the shipped real H&E, a shortcut-
trained head, and the audit that finds it.
"""
