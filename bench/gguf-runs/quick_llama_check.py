import time, json, numpy as np
from llama_cpp import Llama
from transformers import AutoTokenizer
src="/root/.cache/austeer_peft/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
tok=AutoTokenizer.from_pretrained("/root/.cache/austeer_peft/smollm2-135m", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
import sys; sys.path.insert(0,"/work/wt-21b")
from austeer_peft.evaluate import load_task
t=load_task("sst2",n_fit=1,n_validation=0); prompts=t.test["prompt"][:8]
ids=[tok(p).input_ids for p in prompts]; a=[tok(c,add_special_tokens=False).input_ids[0] for c in t.choices]
r=json.load(open("/work/wt-21b/bench/gguf-runs/smollm2-135m.json"))
def m(path):
    t0=time.time(); llm=Llama(model_path=path,n_ctx=512,n_threads=2,logits_all=True,verbose=False); out=[]
    for i in ids:
        llm.reset(); llm.eval(i); l=np.asarray(llm.scores[llm.n_tokens-1]); out.append(l[a[1]]-l[a[0]])
    print(path[-25:], "seconds", round(time.time()-t0,1), flush=True); return np.array(out)
o=m(src)
for s in ("ffn","attention"):
    sh=m(f"/tmp/austeer-bench-gguf/smollm2-135m/merged-{s}.gguf")-o; ref=np.array(r["sites"][s]["steered_shift"][:8])
    print(s, "llama", np.round(sh,2).tolist(), "hf", np.round(ref,2).tolist(), "pearson", round(float(np.corrcoef(sh,ref)[0,1]),3), "sign", float(np.mean(np.sign(sh)==np.sign(ref))), flush=True)
