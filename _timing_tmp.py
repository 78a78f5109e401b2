import time, torch, json
from mrg_core.training import *
from mrg_core.models import ReportModel, ReportModelConfig
from mrg_core.models.language_model import build_lm
cfg = TrainConfig.load("configs/default.json")
splits = load_splits(cfg.data.spec())
texts = lm_texts(cfg, splits["train"])
tok = train_tokenizer(texts, vocab_size=2000, min_frequency=2)
print("lm texts", len(texts), "vocab", len(tok))
lens = [len(x) for x in tok(texts[:2000], add_special_tokens=False)["input_ids"]]
import numpy as np; print("tokens mean/max", np.mean(lens), max(lens), "covctr", np.percentile([len(x) for x in tok([clean_report(e.report) for e in splits['train'] if e.report], add_special_tokens=False)["input_ids"]], [50, 95, 100]))
mc = ReportModelConfig.from_dict(cfg.model)
lm = build_lm(mc.lm, tok)
print("lm params", sum(p.numel() for p in lm.parameters()))
# LM step timing
ids = torch.randint(0, len(tok), (32, 60))
opt = torch.optim.AdamW(lm.parameters(), 1e-3)
for i in range(3):
    t = time.time(); l = lm(input_ids=ids, labels=ids).loss; l.backward(); opt.step(); opt.zero_grad(); print("lm step", time.time() - t)
m = ReportModel.build(mc, tok, lm=lm)
print("encoder params", sum(p.numel() for p in m.encoder.parameters()), "bridge", sum(p.numel() for p in m.bridge.parameters()))
cache = ImageCache(mc.preprocess)
t = time.time(); ex = splits["train"][:16]; pix = cache.batch(ex); print("decode 16", time.time() - t)
loss_mod = LossModule(m); m.train()
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], 1e-3)
from mrg_core.preprocess import augment_batch
labels = torch.tensor([float(e.label) for e in ex])
for i in range(3):
    t = time.time(); out = loss_mod(augment_batch(pix), [e.report for e in ex], labels); out["loss"].backward(); opt.step(); opt.zero_grad(); print("report step", time.time() - t, out["loss"].item())
m.eval()
t = time.time(); s = cache.load_study(splits["val"][0]); r = m.generate_report(s); print("gen", time.time() - t, len(r.split()))
