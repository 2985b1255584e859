"""The vocabulary every part of batchpilot shares, declared once.

What the controller recommends, what the gate applies and reports, what the
operator writes on pods and into status, and what the simulator imitates
must agree to the letter: knob names and limits, the gate's `/config`
document, annotation keys, metric names and condition/Event reasons. They
live here, in a package that imports nothing else of batchpilot's, so that
the gate can ship without the controller and no part re-declares another's
words.
"""
