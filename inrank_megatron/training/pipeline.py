"""Pipeline parallelism for the torch backend: a 1F1B schedule over megatron's pipeline stages.

Each rank holds one stage of the GPTModel (``pre_process`` on the first, ``post_process`` on the
last: megatron builds the stage's transformer layers and names them by global layer number). Per
optimizer step the micro-batches go through the stages in the one-forward-one-backward order
(warm-up forwards, steady 1F1B, cool-down backwards): activations ``[seq (/TP with sequence
parallelism), micro batch, hidden]`` move forward, their gradients backward, with point-to-point
sends over the pipeline group (``isend``, so the 1F1B order cannot deadlock; every send is waited
for before the step returns) and blocking receives. The loss lives on the last stage and is
broadcast to the others for logging.

Megatron's own schedules (``megatron.core.pipeline_parallel``) allocate with ``device="cuda"``
literals, so they cannot run on CPU without a wide patch; this one uses the same model interface
(``set_input_tensor``) and runs on gloo and NCCL alike.

What else pipeline parallelism needs sits with its owner: the torch backend all-reduces the
gradients of the tied word embedding over megatron's embedding group (first and last stage) and
averages gradients over data parallelism itself (DDP's hooks cannot follow 1F1B's interleaved
micro-batches); the gradient norm sums over the stages; the loop gathers growth reports, ranks and
growth state over the stages.
"""

from __future__ import annotations

import torch


class PipelineSchedule:
    """Args: backend (the torch backend of this rank), groups (ParallelGroups), cfg (TrainConfig)."""

    def __init__(self, backend, groups, cfg):
        self.backend = backend
        self.groups = groups
        tp = groups.tp_size
        seq = cfg.model.seq_length // (tp if cfg.parallel.sequence_parallel and tp > 1 else 1)
        self.shape = (seq, cfg.train.micro_batch_size, cfg.model.hidden_size)
        ranks = torch.distributed.get_process_group_ranks(groups.pp_group)
        self.prev = ranks[groups.pp_rank - 1] if not groups.first_stage else None
        self.next = ranks[groups.pp_rank + 1] if not groups.last_stage else None
        self._sends = []
        # NCCL moves CUDA tensors only; gloo CPU ones.
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )

    # ---- point to point ------------------------------------------------------------------------

    def _recv(self, src: int) -> torch.Tensor:
        t = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        torch.distributed.recv(t, src, group=self.groups.pp_group)
        return t

    def _send(self, t: torch.Tensor, dst: int) -> None:
        t = t.detach().to(torch.float32).contiguous()
        self._sends.append((torch.distributed.isend(t, dst, group=self.groups.pp_group), t))

    def _wait_sends(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends = []

    # ---- one micro-batch -----------------------------------------------------------------------

    def _forward(self, batch: dict, num_microbatches: int):
        """Returns ``(input tensor or None, output or scaled loss, loss value or None)``."""
        b = self.backend
        batch = b.to_device(batch)
        x = None
        if not self.groups.first_stage:
            x = self._recv(self.prev).requires_grad_()
        b.model.set_input_tensor(x)
        with b._autocast():
            out = b.model(
                batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"]
            )
        if self.groups.last_stage:
            mask = batch["loss_mask"].to(torch.float32)
            loss = (out.float() * mask).sum() / mask.sum().clamp_min(1)
            return x, loss / num_microbatches, loss.detach()
        self._send(out, self.next)
        return x, out, None

    def _backward(self, x, out, last: bool) -> None:
        # The step's last micro-batch carries the Frobenius decay of this stage's InRank layers.
        penalty = self.backend.frobenius_penalty() if last else None
        if self.groups.last_stage:
            (out if penalty is None else out + penalty).backward()
        else:
            grad = self._recv(self.next).to(out.dtype)
            if penalty is None:
                torch.autograd.backward(out, grad)
            else:
                torch.autograd.backward([out, penalty], [grad, torch.ones_like(penalty)])
        if x is not None:
            self._send(x.grad, self.prev)

    def _broadcast_losses(self, losses: list, n: int) -> list:
        """The last stage's losses on every stage of the pipeline."""
        t = torch.tensor(
            losses if self.groups.last_stage else [0.0] * n, dtype=torch.float64, device=self.device
        )
        last = torch.distributed.get_process_group_ranks(self.groups.pp_group)[-1]
        torch.distributed.broadcast(t, last, group=self.groups.pp_group)
        return t.tolist()

    # ---- a step ----------------------------------------------------------------------------------

    def forward_backward(self, micro: list) -> list:
        """Forward and backward every micro-batch of one optimizer step (1F1B); gradients
        accumulate in ``.grad``. Returns the micro-batch losses (on every stage)."""
        m = len(micro)
        warmup = min(self.groups.pp_size - self.groups.pp_rank - 1, m)
        pending, losses = [], []

        def forward(i):
            x, out, loss = self._forward(micro[i], m)
            pending.append((x, out))
            if loss is not None:
                losses.append(loss.item())

        for i in range(warmup):
            forward(i)
        done = 0  # backwards so far; the m-th is the step's last micro-batch

        def backward():
            nonlocal done
            done += 1
            self._backward(*pending.pop(0), last=done == m)

        for i in range(warmup, m):
            forward(i)
            backward()
        while pending:
            backward()
        self._wait_sends()
        return self._broadcast_losses(losses, m)

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> float:
        """Forward only; the loss on every stage."""
        b = self.backend
        b.model.eval()
        try:
            _, _, loss = self._forward(batch, 1)
        finally:
            b.model.train()
        self._wait_sends()
        return self._broadcast_losses([loss.item()] if loss is not None else [], 1)[0]
