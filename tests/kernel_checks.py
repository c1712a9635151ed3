"""Shared assertion for the fast modules' tests (imported by test files; pytest puts tests/ on the path)."""
import torch


def assert_same_training_step(fast, ref, x, atol=1e-5, rtol=1e-5, param_tol=1e-4, buffer_tol=None):
    """Outputs, input and parameter gradients, and buffers (BN statistics) of ``fast`` and ``ref`` on x."""
    x1 = x.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y1, y2 = fast(x1), ref(x2)
    torch.testing.assert_close(y1, y2, atol=atol, rtol=rtol)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, atol=atol, rtol=rtol)
    for (name, p1), (_, p2) in zip(fast.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, atol=param_tol, rtol=param_tol, msg=name)
    for (name, b1), (_, b2) in zip(fast.named_buffers(), ref.named_buffers()):
        tol = {} if buffer_tol is None else dict(atol=buffer_tol, rtol=buffer_tol)
        torch.testing.assert_close(b1, b2, msg=name, **tol)
