"""ComfyUI's node graphs on imagesmith's engine: node definitions with ComfyUI's schemas (``nodes``), validation
and cached execution (``executor``), and the UI-to-API workflow converter (``ui``).

    executor = GraphExecutor(engine)
    checked = executor.validate(prompt)            # ComfyUI's error shapes, per node
    run = executor.run(prompt, context, checked.outputs)
"""
