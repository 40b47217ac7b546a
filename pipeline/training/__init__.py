"""What the train stage runs on: optimizers and the schedule (optim), the token loader
(dataloader), several processes (distributed), the hardware's limits (hardware), resumable
checkpoints (checkpoint), the curves (curves) and the loop's pieces (loop)."""
