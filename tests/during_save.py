"""Run a training script with something done to it in the middle of trainer.Run.save, after a
checkpoint's shards are written and before its meta.json:

    python tests/during_save.py hang STEP script.py [args ...]   freeze the save of step STEP (to kill it there)
    python tests/during_save.py sigterm script.py [args ...]     SIGTERM the run during every save
"""
import os
import runpy
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import trainer  # noqa: E402

action, args = sys.argv[1], sys.argv[2:]
hang_step = int(args.pop(0)) if action == 'hang' else None
write_json_atomic = trainer._write_json_atomic


def write_meta_json(path, obj):
    if os.path.basename(path) == 'meta.json':
        if action == 'hang' and obj['step'] == hang_step:
            time.sleep(3600)
        if action == 'sigterm':
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # let the handler run before the save goes on
    write_json_atomic(path, obj)


trainer._write_json_atomic = write_meta_json
sys.argv = args
runpy.run_path(os.path.join(ROOT, args[0]), run_name='__main__')
