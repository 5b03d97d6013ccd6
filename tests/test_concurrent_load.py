"""A sparse layer's forward in one thread while another thread loads new packed weights into it (a server
reloading weights): load_state_dict checks the new set first and swaps it in whole, so each forward runs on
the old set or the new one, never a mix of the two (a mix made the kernel read a 1-element values array with
1M-entry indices)."""
import threading
import time

import torch
from torch import nn
import torch.nn.functional as F

import sparseprune as sp

N = 256


def _pair():
    torch.manual_seed(0)
    small, big = nn.Linear(N, N), nn.Linear(N, N)
    with torch.no_grad():
        small.weight.zero_()
        small.weight[0, 0] = 1.0
    s = sp.SparseLinear.from_dense(small, format="csr")
    return small, big, s, s.state_dict(), sp.SparseLinear.from_dense(big, format="csr").state_dict()


def test_forward_racing_load_state_dict_sees_one_whole_set():
    small, big, s, sd_small, sd_big = _pair()
    x = torch.randn(2, N)
    with torch.no_grad():
        # what a forward may legally see: either packed set, whole; the bias Parameter is copied in place, as
        # nn.Linear's would be, so a forward racing that copy reads each bias entry old or new (CI saw a mix once)
        products = [F.linear(x, w.weight) for w in (small, big)]
        biases = torch.stack([small.bias, big.bias])

    def legal(y):
        return any(bool((y - p - biases[:, None, :]).abs().le(1e-4 + 1e-4 * y.abs()).any(0).all()) for p in products)
    stop, errors, bad, calls = [False], [], [], [0]

    def reader():
        with torch.no_grad():
            while not stop[0]:
                try:
                    y = s(x)
                except Exception as e:  # noqa: BLE001 - any failure is what this test looks for
                    errors.append(repr(e))
                    return
                calls[0] += 1
                if not legal(y):
                    bad.append(y)

    def writer():
        i = 0
        while not stop[0]:
            s.load_state_dict(sd_big if i % 2 == 0 else sd_small)
            i += 1

    ts = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in ts:
        t.start()
    time.sleep(1.0)
    stop[0] = True
    for t in ts:
        t.join()
    assert not errors and not bad and calls[0] > 0


def test_a_load_between_reading_the_arrays_and_the_kernel_call_runs_the_old_set():
    """The thread switch made deterministic: the other thread's load runs right after the fast path read
    ``values`` (the old dict object stays what that call reads)."""
    small, big, s, _, sd_big = _pair()

    class Bufs(dict):
        n = 0

        def __getitem__(self, k):
            v = dict.__getitem__(self, k)
            if k == "values":
                Bufs.n += 1
                if Bufs.n == 2:  # the read in the fast path (the first is in forward's gate)
                    s.load_state_dict(sd_big)
            return v
    s._buffers = Bufs(s._buffers)
    x = torch.randn(1, N)
    with torch.no_grad():
        y = s(x)
        torch.testing.assert_close(y, F.linear(x, small.weight, big.bias))  # old packed set, the bias copied in
        torch.testing.assert_close(s(x), big(x), rtol=1e-4, atol=1e-4)  # and the next call the new set
