"""Learning-rate multipliers for training (``model.params.scheduler_config`` in the original configs)."""

from typing import Sequence


class LambdaLinearScheduler:
    """Per cycle: linear warm-up from f_start to f_max over ``warm_up_steps``, then linear from f_max to f_min
    over the rest of the cycle. Called with the global step, returns the factor for the base learning rate."""

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int]):
        if not len(warm_up_steps) == len(f_min) == len(f_max) == len(f_start) == len(cycle_lengths):
            raise ValueError("every LambdaLinearScheduler list needs one entry per cycle")
        self.warm_up_steps, self.f_min, self.f_max = list(warm_up_steps), list(f_min), list(f_max)
        self.f_start, self.cycle_lengths = list(f_start), list(cycle_lengths)
        self.cycle_starts = [0]
        for length in self.cycle_lengths[:-1]:
            self.cycle_starts.append(self.cycle_starts[-1] + length)

    def __call__(self, step: int) -> float:
        cycle = max(i for i, start in enumerate(self.cycle_starts) if start <= step)
        step -= self.cycle_starts[cycle]
        if step < self.warm_up_steps[cycle]:
            return self.f_start[cycle] + (self.f_max[cycle] - self.f_start[cycle]) * step / self.warm_up_steps[cycle]
        span = max(self.cycle_lengths[cycle] - self.warm_up_steps[cycle], 1)
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * max(0.0, 1 - (
            step - self.warm_up_steps[cycle]) / span)
