"""The hostile input corpus: bad and malicious values from MDR and Jira, each run through the real engine."""
