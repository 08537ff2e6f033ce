"""lkvision.data"""
