# Shortcuts for those who prefer make; dev.py does the work and needs only Python.
.PHONY: demo test
demo:
	python3 dev.py demo
test:
	python3 dev.py test
