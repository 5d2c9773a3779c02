"""Training: optimizer and schedules, losses, train state, jitted steps, the loop."""
